"""The rebase probe's algebra (benchmarks/rebase_probe.py): exact where it should be, so its
negative result on SmolLM2 (benchmarks/RESULTS.md) is the method's, not a bug's."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "rebase_probe.py"


def test_rebase_is_exact_for_a_scaled_rotation():
    spec = importlib.util.spec_from_file_location("rebase_probe", SCRIPT)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.check_exact_for_a_scaled_rotation()

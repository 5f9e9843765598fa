"""Data-parallel analysis: two torchrun processes (gloo, CPU) equal one process."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_two_process_torchrun_equals_single_process(tiny_dir, tmp_path):
    common = [
        "analyze",
        str(tiny_dir),
        "--tokens",
        "700",
        "--seq-len",
        "48",
        "--batch-size",
        "2",
        "--dtype",
        "float64",
        "--no-progress",
    ]
    run_cli(*common, "--out", tmp_path / "one")
    run_cli(*common, "--out", tmp_path / "two", nproc=2)
    one = json.loads((tmp_path / "one" / "linearity.json").read_text())
    two = json.loads((tmp_path / "two" / "linearity.json").read_text())
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert one["tokens"] == two["tokens"] == 700
    for a, b in zip(one["layers"], two["layers"], strict=True):
        for key in ("linearity", "linearity_no_residual", "cosine", "angular_distance"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key

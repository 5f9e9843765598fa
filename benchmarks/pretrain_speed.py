"""Pretraining step throughput with the linearity regulariser ÷ without it.

    python benchmarks/pretrain_speed.py [--config tiny] [--steps 12] [KEY=VALUE ...]

Runs ``linearize.train.pretrain`` twice in this process on the same config, seed and data, with
``reg=cosine`` and ``reg=none`` (probes and checkpoints pushed past the end), and times the
optimizer steps between ``on_step`` calls, the first two excluded. Interleaves the two runs'
repeats (none, cosine, none, cosine) so that drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from linearize.train.pretrain import load_config, pretrain


def seconds_per_step(config: str, reg: str, steps: int, overrides: list[str]) -> tuple[float, int]:
    stamps: list[float] = []
    cfg = load_config(config, overrides, reg=reg, probe_every=10**9, save_every=10**9)
    per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum
    cfg.tokens = per_step * steps
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(cfg, Path(tmp), device="cpu", on_step=lambda r: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2), per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    a, overrides = ap.parse_known_args()
    times: dict[str, list[float]] = {"none": [], "cosine": []}
    for _ in range(a.repeats):
        for reg in ("none", "cosine"):
            s, per_step = seconds_per_step(a.config, reg, a.steps, overrides)
            times[reg].append(s)
    best = {k: min(v) for k, v in times.items()}
    print(
        f"config {a.config} {' '.join(overrides)}: {per_step} tokens per step, {a.steps} steps, "
        f"best of {a.repeats}"
    )
    for reg, s in best.items():
        print(
            f"reg={reg:6s}: {s:.3f} s/step ({per_step / s:.0f} tok/s)  all: {[round(x, 3) for x in times[reg]]}"
        )
    print(
        f"ratio tok/s with cosine regulariser ÷ without: {best['none'] / best['cosine']:.3f}  (goal >= 0.95)"
    )


if __name__ == "__main__":
    main()

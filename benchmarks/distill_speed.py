"""Distillation step throughput ÷ a plain student forward+backward on the same batches.

    python benchmarks/distill_speed.py [--steps 6] [--seq-len 512] [--batch-size 4] [--epochs 2]
                                       [--train replacements+neighbors] [--whole-student]

Prunes the embedded SmolLM2 by 8 layers (12–19, one affine map; the paper's choice on this
model), then measures in one process:
  * distill: seconds per optimizer step of ``linearize.train.distill`` itself (teacher forward,
    student forward with the boundary hooks, losses, backward, AdamW), timed between
    ``on_step`` calls with checkpoints and held-out evaluation switched off, first step
    excluded;
  * plain: ``student(**batch, labels=ids).loss.backward()`` plus the same optimizer step, on the
    same batches, with the same parameters trainable.
Prints tokens/s of both and the ratio (goal ≥ 0.8). With ``--epochs 2`` the second pass over the
same batches reads the teacher's states from the cache (what a default run does once its source
repeats) and is timed too. ``--whole-student`` also times the same run with the student's
frozen prefix run in full (``shared_prefix`` switched off), as before that shortcut existed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

import linearize.train.distill as distill_module
from linearize import data, load
from linearize.surgery.prune import PruneConfig, prune
from linearize.train.distill import DistillConfig, distill
from linearize.train.student import select_trainable_


def _distill_times(student_dir: Path, dcfg: DistillConfig, out: Path, steps: int):
    """Seconds per optimizer step of the first epoch (teacher runs) and of later epochs
    (teacher states from the cache; None with one epoch)."""
    stamps: list[float] = []
    cache = str(out / "teacher") if dcfg.epochs > 1 else "off"
    cfg = dataclasses.replace(dcfg, cache_teacher=cache)
    distill(
        str(student_dir),
        cfg,
        out / "run",
        device="cpu",
        on_step=lambda r: stamps.append(time.perf_counter()),
    )
    first = stamps[:steps]
    later = stamps[steps - 1 :]
    cached = (later[-1] - later[0]) / (len(later) - 1) if dcfg.epochs > 1 else None
    return (first[-1] - first[0]) / (len(first) - 1), cached


def _plain_seconds(student_dir: Path, train: str, seq_len: int, batch_size: int, steps: int):
    """Seconds per step of the student's own forward + LM loss + backward + AdamW, with the
    same parameters trainable, on the same batches (the first step excluded)."""
    student, tok = load(str(student_dir), dtype="float32", device="cpu")
    trainable = select_trainable_(student, train)
    opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-4)
    seqs = list(data.token_sequences(tok, "builtin:calib", seq_len, seq_len * batch_size * steps))
    trainable.train()
    times = []
    for b in data.batches(seqs, batch_size, data.pad_id_of(tok)):
        t0 = time.perf_counter()
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        trainable(**b, labels=labels, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / len(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train", default="replacements+neighbors")
    ap.add_argument(
        "--whole-student", action="store_true", help="also time it without the shortcut"
    )
    ap.add_argument("--w-kl", type=float, default=1.0, help="0 = the paper's hidden-only loss")
    ap.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="2: also time a second pass over the same batches (teacher states from the cache)",
    )
    a = ap.parse_args()
    per_step = a.seq_len * a.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = Path(tmp) / "pruned"
        cfg = PruneConfig(
            strategy="layers",
            layers=list(range(12, 20)),
            replace="linear",
            tokens=4096,
            seq_len=a.seq_len,
        )
        prune(None, cfg, eval_data=None, out=student_dir, device="cpu")

        dcfg = DistillConfig(
            tokens=per_step * a.steps,
            seq_len=a.seq_len,
            batch_size=a.batch_size,
            eval_data="",
            save_every=10**9,
            train=a.train,
            w_kl=a.w_kl,
            epochs=a.epochs,
        )
        timed = {"distill": _distill_times(student_dir, dcfg, Path(tmp) / "a", a.steps)}
        if a.whole_student:
            real = distill_module.shared_prefix
            distill_module.shared_prefix = lambda s, t: 0
            try:
                timed["whole student"] = _distill_times(student_dir, dcfg, Path(tmp) / "b", a.steps)
            finally:
                distill_module.shared_prefix = real

        plain_s = _plain_seconds(student_dir, a.train, a.seq_len, a.batch_size, a.steps)
    print(
        f"tokens per step: {per_step} (batch {a.batch_size} × seq {a.seq_len}), "
        f"--train {a.train}, --w-kl {a.w_kl}, {a.steps} steps, first excluded"
    )
    print(f"plain fwd+bwd: {plain_s:.2f} s  ({per_step / plain_s:.0f} tok/s)")
    for name, (first_s, cached_s) in timed.items():
        print(f"{name:13s}: {first_s:.2f} s  ({per_step / first_s:.0f} tok/s)")
        print(f"  ratio ÷ plain tok/s: {plain_s / first_s:.2f}  (goal >= 0.8)")
        if cached_s is not None:
            print(f"  cached epochs: {cached_s:.2f} s, ratio ÷ plain {plain_s / cached_s:.2f}")


if __name__ == "__main__":
    main()

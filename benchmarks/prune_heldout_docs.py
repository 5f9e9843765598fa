"""In-domain perplexity of pruned checkpoints on more documentation than `builtin:eval` holds.

    python benchmarks/prune_heldout_docs.py DIR [DIR ...] [--skip 65536] [--tokens 16384]

`builtin:eval` is every 10th pydoc topic: 7 of the 79 topics of Python 3.11, only 2,630
tokens of SmolLM2, so in-domain ratios measured on it are noisy. The calibration text takes
`builtin:calib` from its start (the default `--tokens 131072 --calib builtin:calib+self`
takes its first 65,536 tokens), so the windows after `--skip` tokens of it were never
calibrated on. Prints each checkpoint's perplexity there and its ratio to the unpruned
model's, by the protocol of `linearize.eval.perplexity` (non-overlapping windows, every
token but a window's first predicted).
"""

from __future__ import annotations

import argparse
import math

import torch

from linearize import data, load
from linearize.eval.perplexity import batch_nll


@torch.no_grad()
def perplexity_of(model, seqs: list[list[int]], pad_id: int) -> float:
    nll, count = 0.0, 0
    model.eval()
    for b in data.batches(seqs, 8, pad_id):
        s, n = batch_nll(model, b)
        nll, count = nll + s, count + n
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", help="pruned checkpoints (linearize prune --out)")
    ap.add_argument("--skip", type=int, default=65536, help="calibration tokens to skip")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens to score")
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()

    base, tok = load(None, dtype="float32", device="cpu")
    seqs = list(data.token_sequences(tok, "builtin:calib", a.seq_len, a.skip + a.tokens))
    held, used = [], 0
    for s in seqs:
        used += len(s)
        if used > a.skip:
            held.append(s)
    n = sum(map(len, held))
    if n < a.tokens:
        raise SystemExit(f"builtin:calib holds only {n} tokens past {a.skip}")
    ref = perplexity_of(base, held, data.pad_id_of(tok))
    print(f"{n} tokens of builtin:calib after the first {a.skip}; unpruned perplexity {ref:.3f}")
    for d in a.dirs:
        model, _ = load(d, dtype="float32", device="cpu")
        p = perplexity_of(model, held, data.pad_id_of(tok))
        print(f"{d}: {p:.3f} ({p / ref:.3f}x)")


if __name__ == "__main__":
    main()

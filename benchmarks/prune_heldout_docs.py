"""In-domain perplexity of pruned checkpoints on more documentation than `builtin:eval` holds.

    python benchmarks/prune_heldout_docs.py DIR [DIR ...] [--skip 65536] [--tokens 16384]

`builtin:eval` held only 2,630 SmolLM2 tokens until 2026-12-02 (every 10th pydoc topic by
name); it now holds ~10% of the characters (11,204 tokens), and this script stays as a second
in-domain check, on unseen documentation of the topics the calibration drew from. The
calibration text takes `builtin:calib` from its start (the default `--tokens 131072 --calib
builtin:calib+self` takes its first 65,536 tokens of 101,826), so the windows after `--skip`
tokens of it were never calibrated on. Prints each checkpoint's perplexity there and its
ratio to the unpruned model's, by the protocol of `linearize.eval.perplexity`
(non-overlapping windows, every token but a window's first predicted).
"""

from __future__ import annotations

import argparse
import math

from linearize import data, load
from linearize.capture import eval_mode
from linearize.eval.perplexity import pooled_nll


def perplexity_of(model, seqs: list[list[int]], pad_id: int) -> float:
    with eval_mode(model):
        nll, count = pooled_nll(model, data.batches(seqs, 8, pad_id))
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", help="pruned checkpoints (linearize prune --out)")
    ap.add_argument("--skip", type=int, default=65536, help="calibration tokens to skip")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens to score")
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()

    base, tok = load(None, dtype="float32", device="cpu")
    pad = data.pad_id_of(tok)
    # whole windows that start at or after --skip: none shares a token with the calibration
    end = a.skip + a.tokens + a.seq_len
    held, start, n = [], 0, 0
    for s in data.token_sequences(tok, "builtin:calib", a.seq_len, end):
        if start >= a.skip and n < a.tokens:
            held.append(s[: a.tokens - n])
            n += len(held[-1])
        start += len(s)
    if n < a.tokens:
        raise SystemExit(f"builtin:calib holds only {n} tokens past {a.skip}")
    ref = perplexity_of(base, held, pad)
    print(f"{n} tokens of builtin:calib after the first {a.skip}; unpruned perplexity {ref:.3f}")
    for d in a.dirs:
        model, _ = load(d, dtype="float32", device="cpu")
        p = perplexity_of(model, held, pad)
        print(f"{d}: {p:.3f} ({p / ref:.3f}x)")


if __name__ == "__main__":
    main()

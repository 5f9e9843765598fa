"""In-domain perplexity of pruned checkpoints on more documentation than `builtin:eval` holds.

    python benchmarks/prune_heldout_docs.py DIR [DIR ...] [--skip 65536] [--tokens 16384]
    python benchmarks/prune_heldout_docs.py DIR [DIR ...] --per-topic

`builtin:eval` held only 2,630 SmolLM2 tokens until 2026-12-02 (every 10th pydoc topic by
name); it now holds ~10% of the characters (11,204 tokens), and this script stays as a second
in-domain check, on unseen documentation of the topics the calibration drew from. The
calibration text takes `builtin:calib` from its start (the default `--tokens 131072 --calib
builtin:calib+self` takes its first 65,536 tokens of 101,826), so the windows after `--skip`
tokens of it were never calibrated on. Prints each checkpoint's perplexity there and its
ratio to the unpruned model's, by the protocol of `linearize.eval.perplexity`
(non-overlapping windows, every token but a window's first predicted). `--per-topic` prints
instead each `builtin:eval` topic's tokens, unpruned perplexity and every checkpoint's ratio,
each topic windowed on its own.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from linearize import data, load
from linearize.eval.perplexity import pooled_nll
from linearize.hooks import eval_mode


def perplexity_of(model, seqs: list[list[int]], pad_id: int) -> float:
    with eval_mode(model):
        nll, count = pooled_nll(model, data.batches(seqs, 8, pad_id))
    return math.exp(nll / count)


def per_topic(models: dict, tok, seq_len: int) -> None:
    """One row per `builtin:eval` topic: its tokens, unpruned perplexity, each ratio."""
    from pydoc_data.topics import topics

    names = {text: key for key, text in sorted(topics.items(), reverse=True)}
    pad = data.pad_id_of(tok)
    print("topic", "tokens", "unpruned", *list(models)[1:], sep="\t")
    with tempfile.TemporaryDirectory() as tmp:
        for text in data.iter_documents(data.resolve_source("builtin:eval")):
            path = Path(tmp) / "topic.txt"
            path.write_text(text, encoding="utf-8")
            seqs = list(data.token_sequences(tok, str(path), seq_len))
            ppl = [perplexity_of(m, seqs, pad) for m in models.values()]
            ratios = [f"{p / ppl[0]:.2f}x" for p in ppl[1:]]
            print(names[text], sum(map(len, seqs)), f"{ppl[0]:.2f}", *ratios, sep="\t")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", help="pruned checkpoints (linearize prune --out)")
    ap.add_argument("--skip", type=int, default=65536, help="calibration tokens to skip")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens to score")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--per-topic", action="store_true", help="each builtin:eval topic instead")
    a = ap.parse_args()

    base, tok = load(None, dtype="float32", device="cpu")
    if a.per_topic:
        models = {
            "unpruned": base,
            **{d: load(d, dtype="float32", device="cpu")[0] for d in a.dirs},
        }
        return per_topic(models, tok, a.seq_len)
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

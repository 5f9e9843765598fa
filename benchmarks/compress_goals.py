"""The goals' table of ``linearize compress``: quality of the original, the cut and the healed
stock model (and, to compare, healed bridged checkpoints), in domain and on two out-of-domain
texts, with the speed and time the compress run recorded.

    python benchmarks/compress_goals.py COMPRESS_DIR [--bridged NAME=DIR ...] [--eval-tokens 16384]

COMPRESS_DIR is a finished ``linearize compress`` output. Every model is scored here by one
protocol (``linearize.eval.perplexity``, windows of 512, the same tokens for every model) on
``builtin:eval`` (in domain), ``fortunes`` (out of domain: the text the defaults were chosen on)
and ``licenses`` (out of domain, never used to choose anything). Prints a markdown table of
ratios to the original and the share of the cut's lost log-perplexity that healing won back.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from linearize import load
from linearize.eval.perplexity import perplexity
from linearize.models import EMBEDDED_NAME

EVALS = {"in domain": "builtin:eval", "fortunes": "fortunes", "licenses": "licenses"}


def scores(model: str | None, tokens: int) -> dict[str, float]:
    m, tok = load(model, dtype="float32", device="cpu")
    return {name: perplexity(m, tok, src, 512, tokens) for name, src in EVALS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compress_dir")
    ap.add_argument("--bridged", action="append", default=[], help="NAME=DIR of a checkpoint")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    a = ap.parse_args()
    out = Path(a.compress_dir)
    rec = json.loads((out / "compress.json").read_text())
    model = rec["settings"]["model"]
    models = {
        "original": None if model == EMBEDDED_NAME else model,
        "cut (stock, not healed)": str(out / "pruned"),
        "compressed (stock, healed)": str(out / "model"),
    }
    models.update(dict(b.split("=", 1) for b in a.bridged))
    rows = {name: scores(path, a.eval_tokens) for name, path in models.items()}
    base, cut = rows["original"], rows["cut (stock, not healed)"]
    print("| model | " + " | ".join(f"× {k}" for k in EVALS) + " | won back (fortunes, licenses) |")
    print("|---|" + "---|" * (len(EVALS) + 1))
    for name, r in rows.items():
        ratios = {k: r[k] / base[k] for k in EVALS}
        back = [
            1 - math.log(ratios[k]) / math.log(cut[k] / base[k]) for k in ("fortunes", "licenses")
        ]
        cells = " | ".join(f"{ratios[k]:.3f}" for k in EVALS)
        print(f"| {name} | {cells} | {back[0]:.0%}, {back[1]:.0%} |", flush=True)
    st = rec["stages"]
    total = sum(s.get("elapsed_s", 0) for s in st.values())
    speed = {r["model"]: r for r in st["measure"].get("speed", [])}.get("compressed", {})
    times = ", ".join(f"{k} {v.get('elapsed_s', 0):.0f} s" for k, v in st.items())
    print(
        f"\ncompress stages: {times} (total {total / 60:.1f} min); prefill × {speed.get('prefill_tok_s_ratio', 0):.2f}, "
        f"decode × {speed.get('decode_tok_s_b1_ratio', 0):.2f}; GGUF logit error "
        f"{st['export'].get('logit_error')}"
    )


if __name__ == "__main__":
    main()

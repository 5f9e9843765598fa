"""Held-out perplexity of every pruning strategy × replacement on SmolLM2, one protocol.

    python benchmarks/prune_quality.py [--ks 0,4,8,12] [--tokens 8192] [--eval-tokens 16384]

Runs ``linearize.surgery.sweep`` (all strategies × none/linear/fold), then the paper's greedy method
with each selection score (linearity, linearity without residual, replacement error) so the
default score is chosen by measurement. Prints Markdown tables whose ratios are to the unpruned
model measured in the same run. Resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from linearize.surgery.prune import SCORES, PruneConfig
from linearize.surgery.sweep import sweep, table_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="0,4,8,12")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="ppl-greedy tokens per candidate")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--strategies", default="all")
    ap.add_argument("--replace", default="none,linear,fold")
    ap.add_argument("--scores", default=",".join(SCORES))
    ap.add_argument("--out", default="linearize-out/bench-prune")
    a = ap.parse_args()
    out = Path(a.out)
    base = PruneConfig(tokens=a.tokens, ppl_tokens=a.ppl_tokens, score="replacement_error")

    def show(r: dict) -> None:
        print(
            f"  {r['strategy']:15s} {r['replace']:6s} k={r['k']:2d} ppl={r['perplexity']}",
            flush=True,
        )

    rows = sweep(
        None,
        base,
        a.ks,
        a.strategies,
        a.replace,
        "builtin:eval",
        a.eval_tokens,
        out / "all",
        device="cpu",
        on_row=show,
    )
    print("\n## every strategy × replacement\n")
    print(table_markdown(rows))
    if a.scores:
        for score in a.scores.split(","):
            cfg = PruneConfig(tokens=a.tokens, score=score)
            rows = sweep(
                None,
                cfg,
                a.ks,
                "linear-greedy",
                "linear",
                "builtin:eval",
                a.eval_tokens,
                out / f"score-{score}",
                device="cpu",
                on_row=show,
            )
            print(f"\n## linear-greedy / linear, --score {score}\n")
            print(table_markdown(rows))


if __name__ == "__main__":
    main()

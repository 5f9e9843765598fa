"""Which fit generalises: the paper's greedy method under every fit variant, in and out of domain.

    python benchmarks/prune_variants.py [--ks 4,8,12] [--tokens 8192] [--eval-tokens 8192]
                                        [--only "NAME;NAME"] [--out DIR]

Each variant is one ``linearize.surgery.sweep`` run (greedy up to the largest k, perplexity taken as
the loop passes each k) on SmolLM2, calibrated on ``builtin:calib``. Perplexity is measured on
``builtin:eval`` (Python documentation, the calibration domain) and on ``fortunes`` (English of
another kind, never used for calibration). ``calib + self`` variants calibrate on half
``builtin:calib`` and half text sampled from the model itself (linearize.selfgen). Ratios are
to the unpruned model measured in the same run. Resumable: rerun the same command.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from linearize.surgery.prune import PruneConfig
from linearize.surgery.sweep import sweep

# name → (replacement, PruneConfig overrides)
MIX = {"calib": "builtin:calib+self"}
# explicit: the defaults changed (fit target, text, refits after the cuts, re-scoring tokens)
PAPER = {"calib": "builtin:calib", "fit_target": "local", "reconstruct": 0, "rescore_tokens": 0}
REFIT = {"reconstruct": 2}  # the MLP output projections of the 2 kept layers after each cut
VARIANTS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "paper (local fit)": ("linear", {}),
    "original": ("linear", {"fit_target": "original"}),
    "original, identity ridge 1e-4": (
        "linear",
        {"fit_target": "original", "prior": "identity", "ridge": 1e-4},
    ),
    "original, rank 64": ("linear", {"fit_target": "original", "rank": 64}),
    "local, calib + self": ("linear", MIX),
    "original, calib + self": ("linear", {"fit_target": "original", **MIX}),
    "original + refit, calib + self": ("linear", {"fit_target": "original", "refit": True, **MIX}),
    "fold (local fit)": ("fold", {}),
    "fold original, calib + self": ("fold", {"fit_target": "original", **MIX}),
    "fold local, calib + self": ("fold", MIX),
    "original, calib + self, reconstruct 2": ("linear", {"fit_target": "original", **MIX, **REFIT}),
    "fold local, calib + self, reconstruct 2": ("fold", {**MIX, **REFIT}),
    "none, calib + self, reconstruct 2": ("none", {**MIX, **REFIT}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="4,8,12")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ood", default="fortunes")
    ap.add_argument("--only", default="", help="variant names separated by ';' (default: all)")
    ap.add_argument("--out", default="linearize-out/bench-variants")
    a = ap.parse_args()
    out = Path(a.out)
    names = [n for n in VARIANTS if not a.only or n in a.only.split(";")]
    ks = [int(k) for k in a.ks.split(",")]
    base_rows = sweep(
        None,
        PruneConfig(tokens=a.tokens, **PAPER),
        [0],
        "linear-greedy",
        "none",
        "builtin:eval",
        a.eval_tokens,
        out / "unpruned",
        device="cpu",
        ood_data=a.ood,
    )
    b_in, b_ood = base_rows[0]["perplexity"], base_rows[0]["perplexity_ood"]
    print(f"original: in-domain {b_in:.2f}, out of domain {b_ood:.2f}", flush=True)
    table = []
    for name in names:
        rep, over = VARIANTS[name]
        cfg = replace(PruneConfig(tokens=a.tokens), **{**PAPER, **over})
        slug = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        rows = sweep(
            None,
            cfg,
            ks,
            "linear-greedy",
            rep,
            "builtin:eval",
            a.eval_tokens,
            out / slug,
            device="cpu",
            ood_data=a.ood,
        )
        for r in sorted(rows, key=lambda r: r["k"]):
            line = {
                "variant": name,
                "k": r["k"],
                "ratio": r["perplexity"] / b_in,
                "ratio_ood": r["perplexity_ood"] / b_ood,
                "elapsed_s": r["elapsed_s"],
                "removed": r["removed"],
            }
            table.append(line)
            print(json.dumps(line), flush=True)
    _print_table(table)


def _print_table(table: list[dict]) -> None:
    print(
        "\n| variant | k | × original, in-domain | × original, out of domain | time (s) | removed |"
    )
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['variant']} | {r['k']} | {r['ratio']:.2f} | {r['ratio_ood']:.2f} | "
            f"{r['elapsed_s']} | {','.join(map(str, r['removed']))} |"
        )


if __name__ == "__main__":
    main()

"""One cut, many fits: SmolLM2 without layers 12–19 (the run every greedy method removes at
k = 8), replaced by one map fitted in different ways, in and out of domain.

    python benchmarks/prune_fits.py [--tokens 8192] [--eval-tokens 8192] [--only N,N]

Cheaper than a greedy sweep (one fit pass per variant), so priors, ranks and calibration
sources can be compared quickly. With one contiguous run, the greedy ``original`` fit is this
very map. Prints one JSON line per variant: perplexity ÷ the unpruned model's on
``builtin:eval`` (in-domain), ``fortunes:eval`` and ``fortunes`` (out of domain).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from linearize import load
from linearize.eval.perplexity import perplexity
from linearize.surgery.prune import PruneConfig, prune_model_

# the map alone (reconstruct 0), unless a variant asks for the refits after it
CUT = dict(strategy="layers", layers=list(range(12, 20)), fit_target="original", reconstruct=0)
VARIANTS = {
    "pydoc": {"calib": "builtin:calib"},
    "pydoc, identity ridge 1e-4": {"calib": "builtin:calib", "prior": "identity", "ridge": 1e-4},
    "pydoc, identity ridge 1e-3": {"calib": "builtin:calib", "prior": "identity", "ridge": 1e-3},
    "pydoc, identity ridge 1e-2": {"calib": "builtin:calib", "prior": "identity", "ridge": 1e-2},
    "pydoc, rank 64": {"calib": "builtin:calib", "rank": 64},
    "self only": {"calib": "self"},
    "pydoc + self": {"calib": "builtin:calib+self"},
    "fortunes:calib (oracle, not a method)": {"calib": "fortunes:calib"},
    "pydoc + self, reconstruct 2 (ridge 0.1)": {"calib": "builtin:calib+self", "reconstruct": 2},
    **{
        f"pydoc + self, reconstruct {n} (ridge {r})": {
            "calib": "builtin:calib+self",
            "reconstruct": n,
            "reconstruct_ridge": r,
        }
        for n, r in ((1, 0.1), (3, 0.1), (4, 0.1), (2, 0.0), (2, 0.01), (2, 1.0))
    },
}
EVALS = ("builtin:eval", "fortunes:eval", "fortunes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--only", default="", help="variant numbers, e.g. 0,6")
    a = ap.parse_args()
    model, tok = load(None, dtype="float32", device="cpu")
    base = [perplexity(model, tok, e, 512, a.eval_tokens, 8) for e in EVALS]
    print(json.dumps({"unpruned": dict(zip(EVALS, base))}), flush=True)
    pick = {int(i) for i in a.only.split(",") if i.strip()}
    for i, (name, over) in enumerate(VARIANTS.items()):
        if pick and i not in pick:
            continue
        m = copy.deepcopy(model)
        start = time.perf_counter()
        prune_model_(m, tok, PruneConfig(tokens=a.tokens, **{**CUT, **over}))
        took = time.perf_counter() - start
        ratios = [perplexity(m, tok, e, 512, a.eval_tokens, 8) / b for e, b in zip(EVALS, base)]
        print(
            json.dumps(
                {
                    "variant": name,
                    **{e: round(r, 3) for e, r in zip(EVALS, ratios)},
                    "prune_s": round(took, 1),
                }
            ),
            flush=True,
        )
        del m


if __name__ == "__main__":
    main()

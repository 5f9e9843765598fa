"""``--strategy search`` against its seeds, training-free, on one protocol.

    python benchmarks/search_compare.py [MODEL] --remove K [--replace fold] \
        [--seeds linear-greedy,block-influence] [--out DIR] [--eval-tokens 16384]

1. ``linearize prune MODEL --strategy search`` into DIR/search (kept if already there): its
   ``prune.json`` holds every seed's choice and each one's KL on the search tokens and on the
   held-out calibration tokens the search never saw.
2. Each seed named in ``--seeds``, cut the same way: ``prune --strategy layers --layers SET``
   with the same replacement and refits, into DIR/<seed> (a seed whose set is the search's is
   the same checkpoint and is not cut again).
3. The original and every cut scored here by one protocol (``linearize.eval.perplexity``,
   windows of 512, the same tokens for every model) on ``builtin:eval`` (in domain),
   ``fortunes`` (out of domain, the text defaults are chosen on) and ``licenses`` (out of
   domain, never used to choose anything). Prints a Markdown table of ratios to the original.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from linearize import load
from linearize.eval.perplexity import perplexity
from linearize.surgery.prune import PruneConfig, prune

EVALS = {"in domain": "builtin:eval", "fortunes": "fortunes", "licenses": "licenses"}


def scores(model: str | None, tokens: int) -> dict[str, float]:
    m, tok = load(model, dtype="float32", device="cpu")
    return {name: perplexity(m, tok, src, 512, tokens) for name, src in EVALS.items()}


def cut(model: str | None, out: Path, cfg: PruneConfig) -> dict:
    if not (out / "prune.json").is_file():
        prune(model, cfg, eval_data=None, ood_data=None, out=out, device="cpu")
    return json.loads((out / "prune.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--remove", required=True)
    ap.add_argument("--replace", default="fold")
    ap.add_argument("--seeds", default="linear-greedy,block-influence")
    ap.add_argument(
        "--tokens", type=int, default=None, help="calibration tokens (default: prune's)"
    )
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="linearize-out/search-compare")
    a = ap.parse_args()
    out = Path(a.out)
    extra = {"tokens": a.tokens} if a.tokens else {}
    base = dict(remove=a.remove, replace=a.replace, **extra)
    rec = cut(a.model, out / "search", PruneConfig(strategy="search", **base))
    search = rec["search"]
    rows = [("search", rec["removed"], search["best"], out / "search")]
    for name in [n.strip() for n in a.seeds.split(",") if n.strip()]:
        seed = search["seeds"].get(name)
        if seed is None:
            print(f"(no seed {name} in this search)")
            continue
        where = out / "search"
        if sorted(seed["removed"]) != sorted(rec["removed"]):
            where = out / name
            cut(a.model, where, PruneConfig(strategy="layers", layers=seed["removed"], **base))
        rows.append((name, seed["removed"], seed, where))
    original = scores(a.model, a.eval_tokens)
    print(
        f"\nsearch: {search['evaluations']} candidates, {search['elapsed_s']} s "
        f"(whole prune {rec['elapsed_s']} s); original perplexity {original}\n"
    )
    print(
        "| strategy | removed | × in domain | × fortunes | × licenses | KL (search) | KL (held-out) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, removed, kl, where in rows:
        got = scores(str(where), a.eval_tokens)
        ratios = " | ".join(f"{got[k] / original[k]:.3f}" for k in EVALS)
        print(
            f"| {name} | {','.join(map(str, sorted(removed)))} | {ratios} | "
            f"{kl['kl']:.4f} | {kl['kl_held_out']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Healing recipes compared on one pruned student: perplexity in domain and out of domain.

    python benchmarks/heal_recipes.py STUDENT --out DIR [--tokens 49152] [--only "NAME;NAME"]

Each recipe is one ``linearize.train.distill`` run on STUDENT (a ``linearize prune`` output) with the
same token budget; its final model is then scored on ``builtin:eval`` (the calibration
domain) and on ``fortunes`` (Debian's fortunes: English prose, never used for training).
Ratios are to the original model's perplexity on the same tokens (from STUDENT's prune.json
when it measured both, else measured here). One JSON line per recipe goes to DIR/recipes.jsonl;
a rerun skips the recipes already there, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from linearize import load
from linearize.eval.perplexity import perplexity
from linearize.train.distill import DistillConfig, distill

RECIPES: dict[str, dict] = {
    "maps, lr 1e-4 (the old default)": {"train": "replacements", "lr": 1e-4},
    "maps, lr 1e-3": {"train": "replacements", "lr": 1e-3},
    "maps + neighbours, lr 5e-4": {"train": "replacements+neighbors", "lr": 5e-4},
    "maps + neighbours, lr 5e-4, KL only": {
        "train": "replacements+neighbors",
        "lr": 5e-4,
        "w_hidden": 0.0,
    },
    "maps + neighbours, lr 5e-4, hidden only": {
        "train": "replacements+neighbors",
        "lr": 5e-4,
        "w_kl": 0.0,
    },
    "LoRA r16 everywhere, lr 5e-4": {"train": "lora", "lr": 5e-4},
    "all weights, lr 5e-5": {"train": "all", "lr": 5e-5},
    # half the text sampled from the teacher: 32,768 tokens, so its 16,384 sampled tokens are
    # the ones `linearize prune` (default --calib builtin:calib+self) already cached
    "maps + neighbours, lr 5e-4, 32k tokens": {
        "train": "replacements+neighbors",
        "lr": 5e-4,
        "tokens": 32768,
    },
    "maps + neighbours, lr 5e-4, 32k tokens, half sampled from the teacher": {
        "train": "replacements+neighbors",
        "lr": 5e-4,
        "tokens": 32768,
        "data": "builtin:calib+self",
    },
}


def score(model_dir: str, tokens: int) -> dict[str, float]:
    model, tok = load(model_dir, dtype="float32", device="cpu")
    return {
        "ppl": perplexity(model, tok, "builtin:eval", 512, tokens),
        "ppl_ood": perplexity(model, tok, "fortunes", 512, tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=49152, help="training tokens per recipe")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--only", default="", help="recipe names separated by ';' (default: all)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "recipes.jsonl"
    done = (
        {json.loads(x)["recipe"] for x in log.read_text().splitlines()} if log.exists() else set()
    )
    pj = json.loads((Path(a.student) / "prune.json").read_text())
    if pj.get("eval_tokens") == a.eval_tokens and pj.get("perplexity_before_ood"):
        base = {"ppl": pj["perplexity_before"], "ppl_ood": pj["perplexity_before_ood"]}
    else:
        base = score(pj["base_model"], a.eval_tokens)
    wanted = [n for n in RECIPES if not a.only or n in a.only.split(";")]
    rows = [("pruned, not healed", a.student, {})] + [(n, None, RECIPES[n]) for n in wanted]
    for name, model_dir, kw in rows:
        if name in done:
            continue
        t0 = time.perf_counter()
        steps = 0
        tokens = kw.get("tokens", a.tokens) if model_dir is None else 0
        if model_dir is None:
            run = out / "run"
            shutil.rmtree(run, ignore_errors=True)
            cfg = DistillConfig(
                **{"tokens": a.tokens, **kw},
                batch_size=a.batch_size,
                eval_data="",
                save_every=10**9,
            )
            steps = distill(a.student, cfg, run, device="cpu")["steps"]
            model_dir = str(run / "final")
        train_s = time.perf_counter() - t0
        ppl = score(model_dir, a.eval_tokens)
        row = {
            "recipe": name,
            **kw,
            "tokens": tokens,
            "steps": steps,
            "train_s": round(train_s, 1),
            **ppl,
            "ratio": ppl["ppl"] / base["ppl"],
            "ratio_ood": ppl["ppl_ood"] / base["ppl_ood"],
        }
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{name:45s} × in-domain {row['ratio']:.3f}  × out of domain {row['ratio_ood']:.3f}"
            f"  ({train_s:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

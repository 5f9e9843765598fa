"""Healing recipes compared on one pruned student: perplexity in domain and out of domain.

    python benchmarks/heal_recipes.py STUDENT --out DIR [--tokens 49152[,98304,...]] [--only "NAME;NAME"]

Each recipe is one ``linearize.train.distill`` run on STUDENT (a ``linearize prune`` output) with the
same token budget (several budgets: one run each, the healing curve); its final model is then
scored on ``builtin:eval`` (the calibration domain), on ``fortunes`` (Debian's fortunes:
English prose, never trained on; the text defaults were chosen on) and on ``licenses``
(Debian's licence texts: legal English that no default was chosen on). Ratios are to the
original model's perplexity on the same tokens, measured here. One JSON line per recipe and
budget goes to DIR/recipes.jsonl; a rerun skips those already there, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from linearize import load, models
from linearize.eval.perplexity import perplexity
from linearize.train.distill import DistillConfig, distill

EVALS = {"ppl": "builtin:eval", "ppl_ood": "fortunes", "ppl_ood2": "licenses"}
# what `linearize compress` healed with until 2026-12-06 (lr 5e-4; its batch was 8, here --batch-size)
COMPRESS = {"train": "replacements+neighbors", "lr": 5e-4, "data": "builtin:calib+self"}
# what it heals with now: one sequence a step at lr 2e-3
COMPRESS_NOW = {**COMPRESS, "lr": 2e-3, "batch_size": 1}
RECIPES: dict[str, dict] = {
    # what `linearize compress` healed with until 2026-12-06 (its distill defaults then)
    "compress default": COMPRESS,
    "compress default, sampled text only": {**COMPRESS, "data": "self"},
    "compress default, all weights, lr 5e-5": {**COMPRESS, "train": "all", "lr": 5e-5},
    "compress default, lr 1e-3": {**COMPRESS, "lr": 1e-3},
    "compress default, lr 2e-3": {**COMPRESS, "lr": 2e-3},
    "compress default, all weights, lr 1e-4": {**COMPRESS, "train": "all", "lr": 1e-4},
    "compress default, sampled text only, lr 2e-3": {**COMPRESS, "data": "self", "lr": 2e-3},
    "compress default, KL only": {**COMPRESS, "w_hidden": 0.0},
    # more optimizer steps for the same tokens: smaller batches (a recipe's batch_size wins
    # over --batch-size)
    "compress default, lr 2e-3, batch 2": {**COMPRESS, "lr": 2e-3, "batch_size": 2},
    "compress default, lr 1e-3, batch 1": {**COMPRESS, "lr": 1e-3, "batch_size": 1},
    "compress default, lr 1e-3, batch 2": {**COMPRESS, "lr": 1e-3, "batch_size": 2},
    "compress default, lr 2e-3, batch 1": {**COMPRESS, "lr": 2e-3, "batch_size": 1},
    "compress default, lr 5e-4, batch 1": {**COMPRESS, "lr": 5e-4, "batch_size": 1},
    # compress's recipe (batch 1, lr 2e-3) with one thing changed
    "all weights, lr 1e-4, batch 1": {**COMPRESS_NOW, "train": "all", "lr": 1e-4},
    "all weights, lr 3e-5, batch 1": {**COMPRESS_NOW, "train": "all", "lr": 3e-5},
    "sampled text only, lr 2e-3, batch 1": {**COMPRESS_NOW, "data": "self"},
    "KL only, lr 2e-3, batch 1": {**COMPRESS_NOW, "w_hidden": 0.0},
    # every layer from the cut on trains (the gradient passes through them anyway)
    "from the cut, lr 1e-3, batch 1": {
        **COMPRESS,
        "train": "from-cut",
        "lr": 1e-3,
        "batch_size": 1,
    },
    "from the cut, lr 3e-4, batch 1": {
        **COMPRESS,
        "train": "from-cut",
        "lr": 3e-4,
        "batch_size": 1,
    },
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


def score(model_dir: str | None, tokens: int) -> dict[str, float]:
    model, tok = load(model_dir, dtype="float32", device="cpu")
    return {key: perplexity(model, tok, src, 512, tokens) for key, src in EVALS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--tokens", default="49152", help="training tokens per recipe; a list: one run each"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--only", default="", help="recipe names separated by ';' (default: all)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "recipes.jsonl"
    done = {_key(json.loads(x)) for x in log.read_text().splitlines()} if log.exists() else set()
    pj = json.loads((Path(a.student) / "prune.json").read_text())
    original = None if pj["base_model"] == models.EMBEDDED_NAME else pj["base_model"]
    base = score(original, a.eval_tokens)
    wanted = [n for n in RECIPES if not a.only or n in a.only.split(";")]
    budgets = [int(t) for t in a.tokens.split(",")]
    rows = [("pruned, not healed", a.student, {}, 0)]
    rows += [(n, None, RECIPES[n], RECIPES[n].get("tokens", t)) for n in wanted for t in budgets]
    for name, model_dir, kw, tokens in rows:
        if (name, tokens) in done:
            continue
        row = _run(a, out, name, model_dir, kw, tokens)
        row.update({f"ratio{k[3:]}": row[k] / base[k] for k in EVALS})
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add((name, tokens))
        print(
            f"{name:45s} {tokens:>8,} tokens  × in-domain {row['ratio']:.3f}  × fortunes "
            f"{row['ratio_ood']:.3f}  × licenses {row['ratio_ood2']:.3f}  ({row['train_s']:.0f} s)",
            flush=True,
        )


def _key(row: dict) -> tuple[str, int]:
    return row["recipe"], row["tokens"]


def _run(a, out: Path, name: str, model_dir: str | None, kw: dict, tokens: int) -> dict:
    """Heal STUDENT by one recipe (none for the unhealed row) and score the result."""
    t0 = time.perf_counter()
    steps = 0
    if model_dir is None:
        run = out / "run"
        shutil.rmtree(run, ignore_errors=True)
        cfg = DistillConfig(
            **{"batch_size": a.batch_size, **kw, "tokens": tokens},
            eval_data="",
            eval_ood="",
            save_every=10**9,
            cache_teacher="off",
        )
        steps = distill(a.student, cfg, run, device="cpu")["steps"]
        model_dir = str(run / "final")
    train_s = time.perf_counter() - t0
    return {
        "recipe": name,
        **kw,
        "tokens": tokens,
        "steps": steps,
        "train_s": round(train_s, 1),
        **score(model_dir, a.eval_tokens),
    }


if __name__ == "__main__":
    main()

"""Speed, size and quality of SmolLM2 pruned by k layers with none / linear / fold, in one table.

    python benchmarks/speed_table.py [--ks 4,8,12] [--tokens 8192] [--eval-tokens 8192] [--out DIR]
                                     [--sweeps DIR | --removed 12,13,...] [--no-quality]

For each replacement, the default greedy pruning (``linearize prune`` defaults, with
``--tokens`` calibration tokens) runs once to the largest k and saves a checkpoint as it passes
each k. Every checkpoint then gets held-out perplexity in-domain (``builtin:eval``) and out of
domain (``fortunes``), and all of them, the original first, are measured by ``linearize.eval.bench``
in one process, interleaved. Checkpoints already in ``--out`` are reused.

Speed does not depend on the fitted values, only on the shapes, so with ``--sweeps DIR`` (the
output of ``benchmarks/prune_variants.py``) the checkpoints are built from the layers those
greedy runs removed (``--strategy layers``, 512 calibration tokens) and ``--no-quality`` leaves
the perplexity columns to those runs. ``--removed L1,L2,…`` does the same from one list of
original layer indices (k = 4 removes its first four), for every replacement.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from linearize import load
from linearize.eval.bench import BenchConfig, bench
from linearize.eval.perplexity import perplexity
from linearize.surgery.prune import PruneConfig, prune_model_
from linearize.surgery.replace import save


def _removals(sweeps: str, rep: str) -> list[dict]:
    sub = {"none": "none", "linear": "original_calib_+_self", "fold": "fold_local_calib_+_self"}
    return json.loads((Path(sweeps) / sub[rep] / "sweep.json").read_text())["rows"]


def _build(model, tok, rep: str, ks: list[int], a: argparse.Namespace, out: Path) -> None:
    """The ``rep`` checkpoints for every k not yet in ``out``: from a removal order
    (``--removed`` or a sweep's), or by running the default greedy pruning to the largest k."""
    todo = [k for k in ks if not (out / f"{rep}-{k}" / "config.json").exists()]
    if todo and (a.sweeps or a.removed):
        if a.removed:
            order = [int(x) for x in a.removed.split(",")]
            rows = [{"k": k, "removed": order[:k]} for k in ks]
        else:
            rows = _removals(a.sweeps, rep)
        for r in rows:
            if r["k"] in todo:
                m = copy.deepcopy(model)
                cfg = PruneConfig(
                    strategy="layers",
                    layers=r["removed"],
                    replace=rep,
                    tokens=512,
                    calib="builtin:calib",
                )
                prune_model_(m, tok, cfg)
                save(m, tok, out / f"{rep}-{r['k']}", {"removed": r["removed"], "replace": rep})
    elif todo:
        m = copy.deepcopy(model)
        done: list[int] = []

        def on_step(step: dict) -> None:
            done.append(step["layer"])
            if len(done) in todo:
                save(m, tok, out / f"{rep}-{len(done)}", {"removed": list(done), "replace": rep})

        prune_model_(m, tok, PruneConfig(remove=max(todo), replace=rep, tokens=a.tokens), on_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="4,8,12")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--replace", default="none,linear,fold")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="linearize-out/bench-speed")
    ap.add_argument("--sweeps", default=None, help="prune_variants.py output: reuse its removals")
    ap.add_argument("--removed", default=None, help="original layers in removal order")
    ap.add_argument("--no-quality", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    ks = [int(k) for k in a.ks.split(",")]
    model, tok = load(None, dtype="float32", device="cpu")
    dirs: list[tuple[str, str]] = []
    for rep in a.replace.split(","):
        _build(model, tok, rep, ks, a, out)
        dirs += [(f"{rep} k={k}", str(out / f"{rep}-{k}")) for k in ks]
    quality = {}
    qpath = out / "quality.json"
    if qpath.exists():
        quality = json.loads(qpath.read_text())
    for label, path in [("original", None), *dirs]:
        if label in quality or a.no_quality:
            continue
        m, t = load(path, dtype="float32", device="cpu")
        quality[label] = [
            perplexity(m, t, src, 512, a.eval_tokens, 8) for src in ("builtin:eval", "fortunes")
        ]
        qpath.write_text(json.dumps(quality, indent=1))
        print(label, quality[label], flush=True)
    rows = bench(
        [None] + [p for _, p in dirs],
        BenchConfig(repeats=a.repeats),
        out / "bench",
        ["original"] + [lab for lab, _ in dirs],
        dtype="float32",
        device="cpu",
        on_round=lambda r: print(f"bench round {r} done", flush=True),
    )
    b_in, b_ood = quality.get("original", (None, None))
    print(
        "\n| model | layers | params (M) | prefill × | decode × (b=1) | decode × (b=4) | "
        "peak extra MB | disk MB | ppl in-domain (×) | ppl out of domain (×) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q_in, q_ood = quality.get(r["model"], (None, None))
        qual = (
            f"{q_in:.2f} ({q_in / b_in:.2f}) | {q_ood:.2f} ({q_ood / b_ood:.2f})"
            if q_in and b_in
            else "see prune_variants | "
        )
        print(
            f"| {r['model']} | {r['layers']} | {r['params_m']:.1f} | "
            f"{r['prefill_tok_s_ratio']:.3f} | {r['decode_tok_s_b1_ratio']:.3f} | "
            f"{r['decode_tok_s_batch_ratio']:.3f} | {r['peak_mem_mb']:.0f} | {r['disk_mb']:.0f} | "
            f"{qual} |"
        )


if __name__ == "__main__":
    main()

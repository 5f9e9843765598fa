"""Analysis speed and memory on the embedded SmolLM2, as ratios measured in one run.

    python benchmarks/analyze_speed.py [--tokens 8192] [--big 65536 | 0] [--paper-tokens 8192 | 0]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16]

Prints:
1. analyze tokens/s ÷ a plain ``model(ids)`` forward on the same batches (goal ≥ 1.0: the LM
   head never runs), and ÷ the body-only forward ``model.model(ids)`` (goal ≥ 0.85);
2. peak RSS of a fresh process analysing --big tokens ÷ one analysing --tokens (goal ≤ 1.10);
3. time and peak RSS of the paper's published code (PyPI ``llm-microscope``, loaded by path
   from its functions.py: output_hidden_states, stack, SVD per layer pair) ÷ ours at equal
   tokens (goal: ours ≥ 5× faster). Needs ``pip install --no-deps llm-microscope``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SEQ, BATCH = 512, 8
RUN = {"device": "cpu", "dtype": "float32"}  # --device / --dtype


def _load():
    from linearize import load

    return load(None, dtype=RUN["dtype"], device=RUN["device"])


def _batches(tok, tokens: int):
    from linearize import data, models

    dev = models.pick_device(RUN["device"])
    seqs = list(data.token_sequences(tok, "builtin", SEQ, tokens))
    return [
        {k: v.to(dev) for k, v in b.items()} for b in data.batches(seqs, BATCH, data.pad_id_of(tok))
    ]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_mb() -> float:
    """Peak memory of this process so far, MB: on a GPU the device's, else resident RAM."""
    if torch.cuda.is_available() and RUN["device"] != "cpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@torch.no_grad()
def throughput(tokens: int, rounds: int = 5) -> dict:
    """Same batches, same process: ours vs --exact vs full forward vs body-only forward.

    Interleaved per batch (the order rotates), each batch timed ``rounds`` times; a method's
    time is the sum over batches of its median. This machine's speed drifts by ±20% over
    minutes, so whole-pass timings taken one after another are not comparable; these are.
    Ours also pays for turning the moments into scores (once per run, timed separately)."""
    from linearize.capture import collect_stats

    model, tok = _load()
    batches = _batches(tok, tokens)
    n = sum(int(b["attention_mask"].sum()) for b in batches)
    runs = {
        "ours": lambda b: collect_stats(model, [b], fast=True),
        "exact": lambda b: collect_stats(model, [b], fast=False),
        "full": lambda b: model(**b, use_cache=False),
        "body": lambda b: model.model(**b, use_cache=False),
    }
    names = list(runs)
    for b in batches[:1]:  # warm-up
        for fn in runs.values():
            fn(b)
    per: dict[str, list[list[float]]] = {k: [[] for _ in batches] for k in runs}
    for r in range(rounds):
        for j, b in enumerate(batches):
            k = (r + j) % len(names)
            for name in names[k:] + names[:k]:
                _sync()
                t = time.perf_counter()
                runs[name](b)
                _sync()
                per[name][j].append(time.perf_counter() - t)
    total = {k: sum(statistics.median(ts) for ts in v) for k, v in per.items()}
    stats = collect_stats(model, batches[:1], fast=True)
    t = time.perf_counter()
    for s in stats.values():
        s.scores()
    total["ours"] += time.perf_counter() - t
    total["exact"] += time.perf_counter() - t
    return {
        "tokens": n,
        "tok_s": {k: n / v for k, v in total.items()},
        "ours_vs_full": total["full"] / total["ours"],
        "ours_vs_body": total["body"] / total["ours"],
        "exact_vs_full": total["full"] / total["exact"],
        "exact_vs_body": total["body"] / total["exact"],
    }


@torch.no_grad()
def child_ours(tokens: int) -> dict:
    from linearize.analyze import analyze_model

    model, tok = _load()
    base = _current_rss_mb()
    t = time.perf_counter()
    rep = analyze_model(model, tok, "builtin", tokens, SEQ, BATCH)
    return {
        "time_s": time.perf_counter() - t,
        "peak_rss_mb": _rss_mb(),
        "after_load_mb": base,
        "tokens": rep.tokens,
        "linearity": [r["linearity"] for r in rep.layers],
    }


@torch.no_grad()
def child_paper(tokens: int) -> dict:
    spec = importlib.util.find_spec("llm_microscope")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-microscope")
    path = Path(list(spec.submodule_search_locations)[0]) / "functions.py"
    mod_spec = importlib.util.spec_from_file_location("microscope_functions", path)
    fns = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(fns)  # its package __init__ is broken; load the file itself

    model, tok = _load()
    batches = _batches(tok, tokens)
    base = _current_rss_mb()
    t = time.perf_counter()
    per_layer: list[list[torch.Tensor]] = []
    for b in batches:
        hs = model(**b, output_hidden_states=True, use_cache=False).hidden_states
        mask = b["attention_mask"].reshape(-1).bool()
        if not per_layer:
            per_layer = [[] for _ in hs]
        for i, h in enumerate(hs):
            per_layer[i].append(h.reshape(-1, h.shape[-1])[mask])
    states = [torch.cat(p) for p in per_layer]
    lin = [fns.procrustes_similarity(states[i], states[i + 1]) for i in range(len(states) - 1)]
    return {
        "time_s": time.perf_counter() - t,
        "peak_rss_mb": _rss_mb(),
        "after_load_mb": base,
        "tokens": int(states[0].shape[0]),
        "linearity": lin,
    }


def _child(mode: str, tokens: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--tokens",
            str(tokens),
            "--device",
            RUN["device"],
            "--dtype",
            RUN["dtype"],
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--big", type=int, default=65536)
    ap.add_argument("--paper-tokens", type=int, default=8192)
    ap.add_argument("--child", choices=["ours", "paper"])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    args = ap.parse_args()
    RUN.update(device=args.device, dtype=args.dtype)
    if args.child:
        fn = child_ours if args.child == "ours" else child_paper
        print(json.dumps(fn(args.tokens)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M "
        f"{RUN['dtype']} on {RUN['device']}"
    )
    tp = throughput(args.tokens)
    print(
        f"\n[1] throughput on {tp['tokens']} tokens (seq {SEQ}, batch {BATCH}), per-batch "
        "medians of 5 interleaved rounds:"
    )
    for k, v in tp["tok_s"].items():
        print(f"    {k:5s} {v:8.0f} tok/s")
    print(f"    analyze ÷ full forward      = {tp['ours_vs_full']:.2f}  (goal >= 1.1)")
    print(f"    analyze ÷ body-only forward = {tp['ours_vs_body']:.2f}  (goal >= 0.9)")
    print(
        f"    --exact ÷ full / ÷ body     = {tp['exact_vs_full']:.2f} / {tp['exact_vs_body']:.2f}"
    )

    if args.big == 0:
        return
    small, big = _child("ours", args.tokens), _child("ours", args.big)
    print(
        f"\n[2] peak RSS: {small['peak_rss_mb']:.0f} MB at {small['tokens']} tokens, "
        f"{big['peak_rss_mb']:.0f} MB at {big['tokens']} tokens"
    )
    print(f"    ratio = {big['peak_rss_mb'] / small['peak_rss_mb']:.3f}  (goal <= 1.10)")

    if args.paper_tokens == 0:
        return
    ours = small if args.paper_tokens == args.tokens else _child("ours", args.paper_tokens)
    paper = _child("paper", args.paper_tokens)
    print(f"\n[3] vs llm-microscope at {paper['tokens']} tokens:")
    for name, r in (("ours", ours), ("paper", paper)):
        print(
            f"    {name:5s} {r['time_s']:7.1f} s   peak RSS {r['peak_rss_mb']:6.0f} MB "
            f"(model loaded: {r['after_load_mb']:.0f} MB)"
        )
    print(
        f"    speed-up = {paper['time_s'] / ours['time_s']:.2f}x  (goal >= 5x); "
        f"peak RSS ratio paper/ours = {paper['peak_rss_mb'] / ours['peak_rss_mb']:.2f}"
    )
    diff = max(abs(a - b) for a, b in zip(ours["linearity"][:-1], paper["linearity"][:-1]))
    print(
        f"    max |Δ linearity| on layers 0..28 = {diff:.2e} (the paper's last pair sees the "
        "final norm through output_hidden_states, so layer 29 differs by design)"
    )


if __name__ == "__main__":
    main()

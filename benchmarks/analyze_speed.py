"""Analysis speed and memory on the embedded SmolLM2, as ratios measured in one run.

    python benchmarks/analyze_speed.py [--tokens 8192] [--big 65536] [--paper-tokens 8192]

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
import subprocess
import sys
import time
from pathlib import Path

import torch

SEQ, BATCH = 512, 8


def _load():
    from linearize import load

    return load(None, dtype="float32", device="cpu")


def _batches(tok, tokens: int):
    from linearize import data

    seqs = list(data.token_sequences(tok, "builtin", SEQ, tokens))
    return list(data.batches(seqs, BATCH, data.pad_id_of(tok)))


def _rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@torch.no_grad()
def throughput(tokens: int) -> dict:
    """Same batches, same process: ours vs full forward vs body-only forward, interleaved."""
    from linearize.capture import collect_stats

    model, tok = _load()
    batches = _batches(tok, tokens)
    n = sum(int(b["attention_mask"].sum()) for b in batches)

    def ours():
        stats = collect_stats(model, batches)
        for s in stats.values():
            s.scores()

    def full():
        for b in batches:
            model(**b, use_cache=False)

    def body():
        for b in batches:
            model.model(**b, use_cache=False)

    runs = {"ours": ours, "full": full, "body": body}
    times: dict[str, list[float]] = {k: [] for k in runs}
    body()  # warm-up
    for _ in range(2):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    return {
        "tokens": n,
        "tok_s": {k: n / v for k, v in best.items()},
        "ours_vs_full": best["full"] / best["ours"],
        "ours_vs_body": best["body"] / best["ours"],
    }


@torch.no_grad()
def child_ours(tokens: int) -> dict:
    from linearize.analyze import analyze_model

    model, tok = _load()
    base = _current_rss_mb()
    t = time.perf_counter()
    rep = analyze_model(model, tok, "builtin", tokens, SEQ, BATCH)
    return {"time_s": time.perf_counter() - t, "peak_rss_mb": _rss_mb(), "after_load_mb": base,
            "tokens": rep.tokens, "linearity": [r["linearity"] for r in rep.layers]}  # fmt: skip


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
    return {"time_s": time.perf_counter() - t, "peak_rss_mb": _rss_mb(), "after_load_mb": base,
            "tokens": int(states[0].shape[0]), "linearity": lin}  # fmt: skip


def _child(mode: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--tokens", str(tokens)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--big", type=int, default=65536)
    ap.add_argument("--paper-tokens", type=int, default=8192)
    ap.add_argument("--child", choices=["ours", "paper"])
    args = ap.parse_args()
    if args.child:
        fn = child_ours if args.child == "ours" else child_paper
        print(json.dumps(fn(args.tokens)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M float32 CPU")
    tp = throughput(args.tokens)
    print(f"\n[1] throughput on {tp['tokens']} tokens (seq {SEQ}, batch {BATCH}), best of 2:")
    for k, v in tp["tok_s"].items():
        print(f"    {k:5s} {v:8.0f} tok/s")
    print(f"    analyze ÷ full forward      = {tp['ours_vs_full']:.2f}  (goal >= 1.0)")
    print(f"    analyze ÷ body-only forward = {tp['ours_vs_body']:.2f}  (goal >= 0.85)")

    small, big = _child("ours", args.tokens), _child("ours", args.big)
    print(f"\n[2] peak RSS: {small['peak_rss_mb']:.0f} MB at {small['tokens']} tokens, "
          f"{big['peak_rss_mb']:.0f} MB at {big['tokens']} tokens")  # fmt: skip
    print(f"    ratio = {big['peak_rss_mb'] / small['peak_rss_mb']:.3f}  (goal <= 1.10)")

    ours = small if args.paper_tokens == args.tokens else _child("ours", args.paper_tokens)
    paper = _child("paper", args.paper_tokens)
    print(f"\n[3] vs llm-microscope at {paper['tokens']} tokens:")
    for name, r in (("ours", ours), ("paper", paper)):
        print(f"    {name:5s} {r['time_s']:7.1f} s   peak RSS {r['peak_rss_mb']:6.0f} MB "
              f"(model loaded: {r['after_load_mb']:.0f} MB)")  # fmt: skip
    print(f"    speed-up = {paper['time_s'] / ours['time_s']:.2f}x  (goal >= 5x); "
          f"peak RSS ratio paper/ours = {paper['peak_rss_mb'] / ours['peak_rss_mb']:.2f}")
    diff = max(abs(a - b) for a, b in zip(ours["linearity"][:-1], paper["linearity"][:-1]))
    print(f"    max |Δ linearity| on layers 0..28 = {diff:.2e} (the paper's last pair sees the "
          "final norm through output_hidden_states, so layer 29 differs by design)")


if __name__ == "__main__":
    main()

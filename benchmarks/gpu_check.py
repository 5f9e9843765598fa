"""A GPU check in one short script: analysis in bfloat16 and float32, the default prune, a few
distillation steps and ``bench`` on the embedded SmolLM2 on CUDA, each compared with what the
same code gives in float32 (and with the CPU record in RESULTS.md), in ≤ 10 minutes.

    python benchmarks/gpu_check.py --out gpu-check [--tokens 65536] [--cpu-tokens 8192]

Prints one table of ratios measured in this run and writes ``gpu-check/gpu_check.json``:
- analysis: bfloat16 and float32 scores on CUDA against float32 on the CPU (same tokens,
  ``--cpu-tokens``), largest |Δ| per score; analysis throughput ÷ a plain body forward;
- prune: ``linearize prune --remove 8`` on CUDA (bfloat16 model, states in bfloat16): removed
  layers and perplexity ratios, beside the CPU float32 default (12–19; RESULTS.md);
- distill: 8 steps on the pruned model, tokens/s, loss finite and falling;
- bench: the original against the pruned model, prefill and decode ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from linearize import analyze_model, arch, load
from linearize.eval.bench import BenchConfig, bench
from linearize.surgery.prune import PruneConfig, prune
from linearize.train.distill import DistillConfig, distill

SCORES = ("linearity", "linearity_no_residual", "cosine", "angular_distance")


def _analysis(dtype: str, device: str, tokens: int) -> tuple[dict, float]:
    model, tok = load(None, dtype=dtype, device=device)
    t0 = time.perf_counter()
    rep = analyze_model(model, tok, "builtin", tokens=tokens, seq_len=512, batch_size=8)
    if device == "cuda":
        torch.cuda.synchronize()
    return {r["layer"]: r for r in rep.layers}, time.perf_counter() - t0


def _forward_seconds(tokens: int) -> float:
    """A plain body forward over the same number of tokens, bfloat16 on CUDA."""
    model, _ = load(None, dtype="bfloat16", device="cuda")
    body = arch.get_body(model)
    ids = torch.randint(3, 40000, (8, 512), device="cuda")
    with torch.no_grad():
        body(input_ids=ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(max(1, tokens // ids.numel())):
            body(input_ids=ids)
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _max_delta(a: dict, b: dict) -> dict[str, float]:
    return {k: max(abs(a[i][k] - b[i][k]) for i in a) for k in SCORES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--cpu-tokens", type=int, default=8192)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs CUDA; this machine has none")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rec: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpu, _ = _analysis("float32", "cpu", a.cpu_tokens)
    gpu32, _ = _analysis("float32", "cuda", a.cpu_tokens)
    gpu16, _ = _analysis("bfloat16", "cuda", a.cpu_tokens)
    rec["analysis_delta_fp32_vs_cpu"] = _max_delta(gpu32, cpu)
    rec["analysis_delta_bf16_vs_cpu"] = _max_delta(gpu16, cpu)
    _, seconds = _analysis("bfloat16", "cuda", a.tokens)
    rec["analysis_s"] = seconds
    rec["analysis_vs_forward"] = _forward_seconds(a.tokens) / seconds
    t0 = time.perf_counter()
    rep = prune(None, PruneConfig(remove=8), out=out / "pruned", dtype="bfloat16", device="cuda")
    rec["prune"] = {k: rep[k] for k in ("removed", "ratio", "ratio_ood", "state_cache_mb")}
    rec["prune"]["s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    d = distill(
        str(out / "pruned"),
        DistillConfig(tokens=8 * 8 * 512, eval_data="", eval_ood=""),
        out=out / "heal",
        device="cuda",
        max_steps=8,
    )
    rec["distill"] = {"steps": d["steps"], "s": time.perf_counter() - t0}
    rec["distill"]["tokens_per_s"] = d["tokens_seen"] / rec["distill"]["s"]
    rows = bench(
        [None, str(out / "pruned")],
        BenchConfig(repeats=3),
        out=out / "bench",
        dtype="bfloat16",
        device="cuda",
    )
    rec["bench"] = {k: rows[1].get(k) for k in rows[1] if "ratio" in k}
    (out / "gpu_check.json").write_text(json.dumps(rec, indent=2, default=str))
    print(json.dumps(rec, indent=2, default=str))


if __name__ == "__main__":
    main()

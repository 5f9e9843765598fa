"""Speed and memory of models side by side: what a pruned checkpoint buys at inference.

Every model is loaded once into one process and measured interleaved (A B C A B C …), so slow
phases of a noisy machine hit every model alike; each figure is the median over ``repeats``
rounds, with its spread (min and max), and also a ratio to the first model. Measured:

- prefill: tokens/s of one forward (no cache) over ``batch_size`` × ``seq_len`` tokens;
- decode: tokens/s of greedy ``generate()`` with the KV cache, ``new_tokens`` new tokens after
  a ``prompt_len``-token prompt, at batch 1 and at ``batch_size``;
- time to first token: ``generate()`` of one token at batch 1;
- memory: on GPU, ``torch.cuda.max_memory_allocated`` during the model's runs; on CPU, the
  peak RSS above the level before each run (sampled every 2 ms), plus the weights' bytes;
- parameters (bridges included) and the checkpoint's size on disk.
"""

from __future__ import annotations

import csv
import io
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from linearize import arch, data
from linearize._fields import option
from linearize._io import claim_output, releases_output, write_json, write_text
from linearize._version import __version__
from linearize.errors import LinearizeError
from linearize.models import load, resolve_model
from linearize.report import png, render_dir

METRICS = ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_batch", "ttft_ms", "peak_mem_mb")
HIGHER_IS_BETTER = {
    "prefill_tok_s": True,
    "decode_tok_s_b1": True,
    "decode_tok_s_batch": True,
    "ttft_ms": False,
    "peak_mem_mb": False,
}


@dataclass
class BenchConfig:
    """How each model is measured."""

    batch_size: int = option(4, "sequences per prefill forward and per batched decode")
    seq_len: int = option(256, "prefill tokens per sequence")
    prompt_len: int = option(32, "decode: prompt tokens per sequence")
    new_tokens: int = option(128, "decode: greedy tokens generated")
    repeats: int = option(3, "interleaved rounds; the median is reported")
    text: str = option("builtin:eval", "where the prompts come from")

    def check(self) -> None:
        for name in ("batch_size", "seq_len", "prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise LinearizeError(f"--{name.replace('_', '-')} must be at least 1")


class _PeakRSS:
    """Peak resident memory above the starting level while the block runs (CPU)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0

    def __enter__(self) -> _PeakRSS:
        self._base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss - self._base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(seconds, peak extra memory in MB) of one call."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**20
    try:
        probe = _PeakRSS()
    except ImportError:  # psutil is optional: time only
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, float("nan")
    with probe:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
    return elapsed, probe.peak / 2**20


def _prompts(tokenizer, c: BenchConfig, length: int, rows: int) -> torch.Tensor:
    seqs = list(data.token_sequences(tokenizer, c.text, length, length * rows))
    seqs = [s for s in seqs if len(s) == length]
    if len(seqs) < rows:
        raise LinearizeError(f"'{c.text}' has fewer than {rows} sequences of {length} tokens")
    return torch.tensor(seqs[:rows])


def _disk_mb(where: str | None) -> float | None:
    path = Path(where) if where else None
    if path is None or not path.exists():
        return None
    files = (
        [path]
        if path.is_file()
        else [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.gguf")]
    )
    return round(sum(f.stat().st_size for f in files) / 2**20, 3)


@torch.no_grad()
def _one_round(
    model: nn.Module,
    tokenizer,
    batches: dict[str, torch.Tensor],
    c: BenchConfig,
    device: torch.device,
) -> dict[str, float]:
    pad = data.pad_id_of(tokenizer)
    full, prompt = batches["prefill"].to(device), batches["prompt"].to(device)

    def generate(ids: torch.Tensor, n: int) -> None:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
        )
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} tokens, not {n}")

    t_pre, m_pre = _timed(lambda: model(input_ids=full, use_cache=False), device)
    t_first, _ = _timed(lambda: generate(prompt[:1], 1), device)
    t_b1, m_b1 = _timed(lambda: generate(prompt[:1], c.new_tokens), device)
    t_bb, m_bb = _timed(lambda: generate(prompt, c.new_tokens), device)
    # Decode rate: the new tokens over the time after the first one (the prompt's prefill).
    rate = lambda rows, t: rows * (c.new_tokens - 1) / max(t - t_first, 1e-9)  # noqa: E731
    return {
        "prefill_tok_s": full.numel() / t_pre,
        "ttft_ms": 1000 * t_first,
        "decode_tok_s_b1": rate(1, t_b1),
        "decode_tok_s_batch": rate(prompt.shape[0], t_bb),
        "peak_mem_mb": max(m_pre, m_b1, m_bb),
    }


def bench_loaded(
    entries: list[tuple[str, nn.Module, object, str | None]],
    config: BenchConfig | None = None,
    on_round: Callable[[int], None] | None = None,
) -> list[dict]:
    """Measure in-memory models: ``entries`` are (label, model, tokenizer, checkpoint path or
    None). Returns one row per model, in order, with medians, spreads and ratios to the first."""
    c = config or BenchConfig()
    c.check()
    if not entries:
        raise LinearizeError("bench needs at least one model")
    inputs = []
    for _, _model, tok, _ in entries:
        inputs.append(
            {
                "prefill": _prompts(tok, c, c.seq_len, c.batch_size),
                "prompt": _prompts(tok, c, c.prompt_len, c.batch_size),
            }
        )
    samples: list[list[dict[str, float]]] = [[] for _ in entries]
    for i, (_, model, tok, _) in enumerate(entries):  # warm-up, not counted
        dev = arch.input_device(model)
        _one_round(model, tok, inputs[i], BenchConfig(**{**asdict(c), "new_tokens": 2}), dev)
    for r in range(c.repeats):
        for i, (_, model, tok, _) in enumerate(entries):
            dev = arch.input_device(model)
            samples[i].append(_one_round(model, tok, inputs[i], c, dev))
        if on_round is not None:
            on_round(r + 1)
    rows = []
    for (label, model, _, where), runs in zip(entries, samples, strict=True):
        row: dict = {
            "model": label,
            "path": where,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "weights_mb": round(
                sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1
            ),
            "disk_mb": _disk_mb(where),
            "layers": arch.n_layers(model),
        }
        for m in METRICS:
            vals = [s[m] for s in runs]
            row[m] = statistics.median(vals)
            row[f"{m}_min"], row[f"{m}_max"] = min(vals), max(vals)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for m in (*METRICS, "params_m", "disk_mb"):
            b, v = base.get(m), row.get(m)
            row[f"{m}_ratio"] = (v / b) if b and v == v and b == b and v is not None else None
    return rows


@releases_output
def bench(
    models: list[str | None],
    config: BenchConfig | None = None,
    out: str | Path | None = None,
    labels: list[str] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    on_round: Callable[[int], None] | None = None,
) -> list[dict]:
    """Load each model once (anything ``linearize.load`` reads), measure them interleaved, and
    write bench.json/.csv/.md and a figure (PNG + HTML) into ``out``; returns the rows."""
    c = config or BenchConfig()
    c.check()
    if labels is not None and len(labels) != len(models):
        raise LinearizeError(f"{len(labels)} labels for {len(models)} models")
    out_dir = Path(out) if out is not None else Path("linearize-out/bench")
    claim_output(out_dir, model=list(models))
    data.resolve_source(c.text)
    entries = []
    for i, name in enumerate(models):
        model, tok = load(name, dtype=dtype, device=device)
        where, kw = resolve_model(name)
        path = str(Path(where) / kw["gguf_file"]) if "gguf_file" in kw else where
        label = labels[i] if labels else (name or "embedded")
        entries.append((label, model, tok, path))
    rows = bench_loaded(entries, c, on_round)
    dev = arch.input_device(entries[0][1])
    report = {
        "config": asdict(c),
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "version": __version__,
        "rows": rows,
    }
    write_json(out_dir / "bench.json", report)
    write_text(out_dir / "bench.csv", _csv(rows))
    write_text(out_dir / "bench.md", table_markdown(rows))
    png.bench_png(rows, out_dir / "bench.png")
    render_dir(out_dir)  # and a prune page beside it, which shows the speed it can now read
    return rows


CSV_COLUMNS = (
    "model",
    "layers",
    "params_m",
    "disk_mb",
    "weights_mb",
    *METRICS,
    *(f"{m}_ratio" for m in METRICS),
    "path",
)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _fmt(v, spec: str = ".1f") -> str:
    return "" if v is None or v != v else format(v, spec)


def table_markdown(rows: list[dict]) -> str:
    head = (
        "| model | layers | params (M) | prefill tok/s | × | decode tok/s (b=1) | × | "
        "decode tok/s (batch) | × | first token (ms) | peak extra memory (MB) | disk (MB) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        body += (
            f"| {r['model']} | {r['layers']} | {_fmt(r['params_m'], '.1f')} | "
            f"{_fmt(r['prefill_tok_s'])} | {_fmt(r['prefill_tok_s_ratio'], '.2f')} | "
            f"{_fmt(r['decode_tok_s_b1'])} | {_fmt(r['decode_tok_s_b1_ratio'], '.2f')} | "
            f"{_fmt(r['decode_tok_s_batch'])} | {_fmt(r['decode_tok_s_batch_ratio'], '.2f')} | "
            f"{_fmt(r['ttft_ms'])} | {_fmt(r['peak_mem_mb'])} | {_fmt(r['disk_mb'])} |\n"
        )
    return head + body

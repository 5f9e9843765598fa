"""Linearity analysis runs: from a model and a data source to a report on disk.

``analyze_model`` works on a model already in memory (pruning re-scores through it);
``analyze`` loads the model, runs, and writes ``linearity.json`` (the contract other tools
read), ``linearity.csv``, ``linearity.png`` and ``report.html`` into the output directory.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from linearize import arch, data, models
from linearize._fields import int_list, option
from linearize._io import claim_output, releases_output, write_json, write_text
from linearize.capture import check_massive, collect_stats
from linearize.errors import LinearizeError
from linearize.linearity import SCORE_KEYS, LinearityReport
from linearize.report import png, render

__all__ = ["SCORE_KEYS", "AnalyzeConfig", "LinearityReport", "analyze", "analyze_model"]


def save_report(report: LinearityReport, out: Path) -> None:
    """Write linearity.json (the contract other tools read), .csv, .png and report.html, each
    atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "linearity.json", report.to_dict())
    write_text(out / "linearity.csv", report.to_csv())
    title = f"{report.model} — {report.tokens:,} tokens of {report.data}"
    png.linearity_png(report.layers, title, out / "linearity.png")
    render(out / "linearity.json")


@dataclass
class AnalyzeConfig(models.Placement):
    """What an analysis reads and how. Each field is an option of ``linearize analyze`` and a
    keyword of ``analyze`` (whose defaults are these)."""

    data_source: str = option(
        "builtin",
        "builtin | FILE | DIR of .txt | FILE.jsonl | HF name[:config[:split]]",
        flag="--data",
    )
    tokens: int | None = option(65536, "total tokens to analyse (cap)")
    seq_len: int = option(512, "tokens per sequence")
    batch_size: int = option(8, "sequences per forward pass")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16 | float64")
    layers: list[int] | None = option(
        None, "only these layers, e.g. 0,5,9", cli=str, parse=int_list
    )
    anisotropy: bool = option(False, "also report each output's anisotropy")
    exact: bool = option(False, "float64 d×d products (default float32: within ~1e-6, faster)")
    massive: float = option(
        0.0,
        "leave out tokens whose state norm passes this many times the batch median (attention "
        "sinks: on SmolLM2 they hold ~97% of the energy from layer 11 on); 0: every token",
    )


_D = AnalyzeConfig()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_layers(layers: Sequence[int] | None, total: int) -> list[int] | None:
    if layers is None:
        return None
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise LinearizeError(f"layer indices {bad} out of range: the model has {total} layers")
    if len(set(layers)) != len(layers):
        raise LinearizeError(f"duplicate layer indices in {list(layers)}")
    return sorted(layers)


def analyze_model(
    model: torch.nn.Module,
    tokenizer,
    data_source: str = "builtin",
    tokens: int | None = 65536,
    seq_len: int = 512,
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    anisotropy: bool = False,
    on_batch: Callable[[int], None] | None = None,
    model_name: str | None = None,
    exact: bool = False,
    massive: float = 0.0,
) -> LinearityReport:
    """Score every decoder layer (or ``layers``) of an in-memory causal LM.

    Sequences are sharded over torch.distributed ranks when a process group is up; the
    statistics are then summed, so every rank returns the same report. Each batch's d×d
    products run in float32 (within ~1e-6 of float64 on SmolLM2, see PairStats); ``exact``
    takes them in float64, at about 1.3× the analysis time on CPU. ``massive``: score without
    the tokens of massive norm (stats.typical_rows), so the scores describe the text.
    """
    start = time.perf_counter()
    _, module_list = arch.get_layers(model)
    chosen = _check_layers(layers, len(module_list))
    source = data.resolve_source(data_source)
    rank, world = _rank_world()
    seqs = data.token_sequences(tokenizer, source, seq_len, tokens, rank=rank, world_size=world)
    batches = data.batches(seqs, batch_size, data.pad_id_of(tokenizer))
    stats = collect_stats(model, batches, chosen, on_batch, fast=not exact, massive=massive)
    n = next(iter(stats.values())).n if stats else 0
    if n == 0:
        raise LinearizeError(f"data source '{data_source}' gave no tokens")
    d = model.config.hidden_size
    if n <= d:
        warnings.warn(
            f"only {n} tokens for hidden size {d}: with fewer tokens than dimensions any layer "
            "fits a linear map almost exactly, so linearity is trivially near 1",
            stacklevel=2,
        )
    rows = []
    for i in sorted(stats):
        rows.append({"layer": i, **stats[i].scores(anisotropy=anisotropy)})
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return LinearityReport(
        model=str(name),
        data=source.spec,
        tokens=n,
        seq_len=seq_len,
        layers=rows,
        elapsed_s=round(time.perf_counter() - start, 3),
    )


def default_out_dir(model: str | None) -> Path:
    slug = Path(model).name if model else "smollm2-135m-instruct"
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in slug) or "model"
    return Path("linearize-out") / f"analyze-{slug}"


@releases_output
def analyze(
    model: str | None = None,
    data_source: str = _D.data_source,
    tokens: int | None = _D.tokens,
    seq_len: int = _D.seq_len,
    batch_size: int = _D.batch_size,
    out: str | Path | None = None,
    dtype: str = _D.dtype,
    device: str = "auto",
    device_map: str | None = _D.device_map,
    max_memory: str | None = _D.max_memory,
    offload_dir: str | None = _D.offload_dir,
    layers: Sequence[int] | None = _D.layers,
    anisotropy: bool = _D.anisotropy,
    on_batch: Callable[[int], None] | None = None,
    save: bool = True,
    exact: bool = _D.exact,
    massive: float = _D.massive,
) -> LinearityReport:
    """Load ``model`` (None: the embedded SmolLM2), score it on ``data_source`` and write the
    report into ``out`` (default ``linearize-out/analyze-<model>``). Bad input is refused with
    a LinearizeError before any work and before anything is written."""
    out_dir = Path(out) if out is not None else default_out_dir(model)
    if save:
        claim_output(out_dir, model=model)
    place = models.Placement(device_map=device_map, max_memory=max_memory, offload_dir=offload_dir)
    _check_request(data_source, tokens, seq_len, massive, place)
    lm, tok = models.load(model, dtype, device, device_map, offload=place.offload())
    name = model or models.EMBEDDED_NAME
    report = analyze_model(
        lm,
        tok,
        data_source,
        tokens,
        seq_len,
        batch_size,
        layers,
        anisotropy,
        on_batch,
        model_name=name,
        exact=exact,
        massive=massive,
    )
    report.config = {
        "model": name,
        "data": data_source,
        "tokens": tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "device_map": device_map,
        "layers": list(layers) if layers is not None else None,
        "world_size": _rank_world()[1],
        "massive": massive,
        **_run_facts(lm, exact),
    }
    if save and _rank_world()[0] == 0:
        save_report(report, out_dir)
    return report


def _run_facts(lm: torch.nn.Module, exact: bool) -> dict:
    """How the run computed: dtypes, where the model ran (with ``device_map``, where
    accelerate placed its modules: "disk" means offloaded), library versions."""
    placement = models.placement_of(lm)
    return {
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "placement": sorted(set(placement.values())),
        "products": "float64" if exact or lm.dtype == torch.float64 else "float32",
        "torch": torch.__version__,
        "transformers": _transformers_version(),
    }


def _check_request(
    data_source: str, tokens: int | None, seq_len: int, massive: float, place: models.Placement
) -> None:
    """Refuse bad options and a bad source before the model is loaded."""
    place.check_placement()
    if seq_len < 1:
        raise LinearizeError(f"--seq-len must be at least 1, got {seq_len}")
    if tokens is not None and tokens < 1:
        raise LinearizeError(f"--tokens must be at least 1, got {tokens}")
    check_massive(massive)
    data.resolve_source(data_source)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__

"""``linearize analyze`` and ``linearize dynamics``: linearity of one model, and across a
series of checkpoints."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from linearize import plan
from linearize._io import strict_json
from linearize.analyze import AnalyzeConfig, analyze, default_out_dir
from linearize.cli.progress import token_progress
from linearize.cli.runtime import Device, DryRun, OutDir, command, init_distributed, with_config
from linearize.train import dynamics


@command("analyze")
@with_config(AnalyzeConfig)
def analyze_command(
    model: Annotated[
        str | None,
        typer.Argument(help="Hub id, local HF directory or .gguf file (default: embedded SmolLM2)"),
    ] = None,
    config: AnalyzeConfig | None = None,
    out: Annotated[Path | None, typer.Option(help="output directory")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="print the JSON report to stdout")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
    dry_run: DryRun = False,
) -> None:
    """Score every decoder layer: linearity (with / without residual), cosine, angular distance,
    block influence. Writes linearity.json/.csv/.png and report.html into --out."""
    if dry_run:
        tokens, batch, seq = config.tokens or 65536, config.batch_size, config.seq_len

        def build(cfg, label, dt):
            return plan.analyze_plan(cfg, label, tokens, batch, seq, dt)

        timing = (lambda p: p.passes * tokens, batch, seq)
        typer.echo(plan.planned("analyze", model, build, config.dtype, device, timing).text())
        return
    rank, world = init_distributed()
    if world > 1 and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
    out_dir = default_out_dir(model) if out is None else out
    with token_progress(config.tokens, progress and rank == 0, world) as on_batch:
        fields = dataclasses.asdict(config)
        report = analyze(model, out=out_dir, device=device, on_batch=on_batch, **fields)
    if rank != 0:
        return
    if as_json:
        sys.stdout.write(strict_json(report.to_dict()) + "\n")
    else:
        _print_table(report, out_dir)


def _print_table(report, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report.model}: {report.tokens:,} tokens, {report.elapsed_s:.1f} s")
    for col in ("layer", "linearity", "no residual", "cosine", "angular dist."):
        t.add_column(col, justify="right")
    for r in report.layers:
        t.add_row(
            str(r["layer"]),
            f"{r['linearity']:.4f}",
            f"{r['linearity_no_residual']:.4f}",
            f"{r['cosine']:.4f}",
            f"{r['angular_distance']:.4f}",
        )
    console = Console()
    console.print(t)
    console.print(f"wrote {out_dir}/linearity.json, linearity.csv, linearity.png, report.html")


@command("dynamics")
def dynamics_command(
    checkpoints: Annotated[
        list[str],
        typer.Argument(
            metavar="CKPT...", help="dirs, training output dirs, or hub ids with @revision"
        ),
    ],
    data: Annotated[str, typer.Option(help="text source")] = "builtin:eval",
    tokens: Annotated[int, typer.Option(help="tokens per checkpoint")] = 16384,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float64 | auto")] = "float32",
    device: Device = "auto",
    out: OutDir = Path("linearize-out/dynamics"),
) -> None:
    """Linearity across a series of checkpoints: dynamics.json/.csv/.md/.png/.html."""
    rows = dynamics.dynamics(
        checkpoints,
        data_source=data,
        tokens=tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        out=out,
        dtype=dtype,
        device=device,
        on_row=lambda r: typer.echo(f"  step {r['step']}: {r['mean_linearity']:.4f}", err=True),
    )
    typer.echo(dynamics.table_markdown(rows) + f"wrote {out}/dynamics.json, .csv, .md, .png, .html")

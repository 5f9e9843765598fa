"""``linearize prune`` (and its ``--sweep``), ``linearize export`` and ``linearize compress``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from linearize import plan
from linearize.cli.progress import phase_progress
from linearize.cli.runtime import Device, DryRun, OutDir, ShowProgress, command, with_config
from linearize.errors import LinearizeError
from linearize.report.labels import num
from linearize.surgery import compress, export, prune, sweep
from linearize.surgery.compress import CompressConfig
from linearize.surgery.prune import PruneConfig


@command("prune")
@with_config(PruneConfig)
def prune_command(
    model: Annotated[
        str | None, typer.Argument(help="model to prune (default: embedded SmolLM2)")
    ] = None,
    config: PruneConfig | None = None,
    eval_data: Annotated[
        str, typer.Option("--eval", help="held-out perplexity source ('' to skip)")
    ] = "builtin:eval",
    eval_ood: Annotated[
        str,
        typer.Option(
            help="out-of-domain perplexity source ('' to skip; default: "
            "'fortunes' when Debian's fortunes package is installed)"
        ),
    ] = "default",
    eval_tokens: Annotated[int, typer.Option(help="held-out tokens")] = 16384,
    sweep: Annotated[
        str | None,
        typer.Option(help="counts to sweep, e.g. 0,2,4,8: writes a table and plot, no checkpoint"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float64")] = "auto",
    device: Device = "auto",
    progress: ShowProgress = True,
    dry_run: DryRun = False,
) -> None:
    """Remove the most linear layers and write a checkpoint that linearize.load reads
    (with --sweep: compare strategies × replacements over several counts)."""
    if config.layers is not None and config.strategy == "linear-greedy":
        config.strategy = "layers"
    if dry_run:

        def build(cfg, label, dt):
            return plan.prune_plan(cfg, label, config, eval_tokens, dt)

        timing = (lambda p: p.passes * config.tokens + 2 * eval_tokens, 8, config.seq_len)
        typer.echo(plan.planned("prune", model, build, dtype, device, timing).text())
        return
    where = dict(eval_tokens=eval_tokens, dtype=dtype, device=device)
    with phase_progress(progress) as (on_progress, say):
        if sweep is not None:
            if config.device_map:
                raise LinearizeError(
                    "--sweep prunes a copy of the model per method: no --device-map"
                )
            kw = dict(eval_data=eval_data, ood=eval_ood, on_progress=on_progress, say=say)
            _run_sweep(model, config, sweep, out=out, **kw, **where)
            return
        out = out or Path("linearize-out/pruned")
        rep = prune.prune(
            model,
            config,
            eval_data=eval_data or None,
            out=out,
            on_step=lambda step: say(
                f"removed layer {step['layer']} (score {num(step['score'], 5)})"
            ),
            ood_data=eval_ood,
            on_progress=on_progress,
            **where,
        )
    _say_pruned(rep, out)


def _say_pruned(rep: dict, out: Path) -> None:
    more = ""
    if rep.get("perplexity_before_ood"):
        more = (
            f"; out of domain ({rep['ood_data']}) {num(rep['perplexity_before_ood'])} -> "
            f"{num(rep['perplexity_after_ood'])}"
        )
    if rep.get("reconstructed"):
        more += f"; refit the MLP output projections of layers {rep['reconstructed']}"
    if rep.get("reconstructed_attention"):
        more += f" and the attention output projections of {rep['reconstructed_attention']}"
    typer.echo(
        f"removed {rep['removed']} ({rep['strategy']}, replace={rep['replace']}); "
        f"perplexity {num(rep['perplexity_before'])} -> {num(rep['perplexity_after'])}{more}; "
        f"wrote {out}"
    )


def _run_sweep(
    model, config, ks, *, eval_data, eval_tokens, out, dtype, device, ood, on_progress, say
) -> None:
    if not eval_data:
        raise LinearizeError("--sweep needs a held-out source (--eval)")
    out = out or Path("linearize-out/sweep")

    def on_row(r: dict) -> None:
        say(
            f"{r['strategy']} / {r['replace']} / k={r['k']}: perplexity "
            f"{r['perplexity'] or r['note']}"
        )

    rows = sweep.sweep(
        model,
        config,
        ks,
        strategies=config.strategy,
        replacements=config.replace,
        eval_data=eval_data,
        eval_tokens=eval_tokens,
        out=out,
        dtype=dtype,
        device=device,
        on_row=on_row,
        ood_data=ood,
        on_progress=on_progress,
    )
    typer.echo(sweep.table_markdown(rows))
    typer.echo(f"wrote {out}/sweep.json, sweep.csv, sweep.md, sweep.png, sweep.html")


@command("compress")
@with_config(CompressConfig)
def compress_command(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="[MODEL] [GROUP.KEY=VALUE ...]: the model (default: embedded SmolLM2), then "
            "options of the commands underneath, e.g. prune.tokens=65536 distill.lr=1e-3 "
            "bench.repeats=5"
        ),
    ] = None,
    config: CompressConfig | None = None,
    out: OutDir = Path("linearize-out/compressed"),
    device: Device = "auto",
    progress: ShowProgress = True,
    dry_run: DryRun = False,
) -> None:
    """Cut, heal and export in one resumable run: a stock checkpoint (OUT/model), its GGUF
    (OUT/model.gguf), and quality against speed (OUT/compress.json, compress.html)."""
    items = args or []
    models_given = [a for a in items if "=" not in a]
    if len(models_given) > 1:
        raise LinearizeError(f"one model at a time, got {', '.join(models_given)}")
    model = models_given[0] if models_given else None
    if dry_run:
        typer.echo(compress.planned(model, config, [a for a in items if "=" in a], device).text())
        return
    with phase_progress(progress) as (on_progress, say):
        rec = compress.compress(
            model,
            config,
            overrides=[a for a in items if "=" in a],
            out=out,
            device=device,
            on_progress=on_progress,
            say=say,
        )
    typer.echo(compress.summary_line(rec, out))


@command("export")
def export_command(
    model: Annotated[
        str | None, typer.Argument(help="stock checkpoint directory (default: embedded SmolLM2)")
    ] = None,
    gguf: Annotated[Path, typer.Option(help="GGUF file to write")] = Path(
        "linearize-out/model.gguf"
    ),
    outtype: Annotated[str, typer.Option(help="f32 | f16 | bf16 | q8_0")] = "f16",
) -> None:
    """Write a checkpoint (original, pruned with --replace none|fold, distilled) as a GGUF file
    for llama.cpp and Ollama, with llama.cpp's own converter."""
    rep = export.export_gguf(model, gguf, outtype=outtype)
    typer.echo(
        f"wrote {rep['gguf']} ({rep['outtype']}, {rep['layers']} layers, "
        f"{rep['bytes'] / 2**20:.1f} MiB)"
    )

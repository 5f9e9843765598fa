"""``linearize distill``, ``linearize pretrain`` and ``linearize finetune``: the commands that
train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from linearize import plan
from linearize.cli.progress import step_progress
from linearize.cli.runtime import Device, DryRun, OutDir, Resume, command, with_config
from linearize.report.labels import num
from linearize.train import distill, finetune, pretrain
from linearize.train.distill import DistillConfig
from linearize.train.finetune import FinetuneConfig
from linearize.train.pretrain import PretrainConfig


@command("distill", context_settings={"allow_extra_args": False})
@with_config(DistillConfig)
def distill_command(
    student: Annotated[str, typer.Argument(help="a checkpoint written by linearize prune")],
    config: DistillConfig | None = None,
    resume: Resume = False,
    out: OutDir = Path("linearize-out/distilled"),
    device: Device = "auto",
    dry_run: DryRun = False,
) -> None:
    """Heal a pruned model: train its replacements against the original's hidden states."""
    if dry_run:

        def build(cfg, label, dt):
            return plan.distill_plan(cfg, label, config, dt)

        timing = (lambda p: 3 * config.tokens * config.epochs, config.batch_size, config.seq_len)
        typer.echo(plan.planned("distill", student, build, "float32", device, timing).text())
        return
    with step_progress() as (on_step, on_progress):
        res = distill.distill(
            student,
            config,
            out=out,
            resume=resume,
            device=device,
            on_step=on_step,
            on_progress=on_progress,
        )
    typer.echo(
        f"{res['steps']} steps, {res['tokens_seen']:,} tokens, {res['elapsed_s']} s; "
        f"held-out perplexity {num(res['perplexity_before'])} -> {num(res['perplexity_after'])}; "
        f"wrote {out}/final"
    )


@command("pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@with_config(PretrainConfig, name="given", given_only=True)
def pretrain_command(
    ctx: typer.Context,
    config: Annotated[str, typer.Option(help="tiny | 150m | 650m | FILE.yaml")] = "tiny",
    given: dict | None = None,
    resume: Resume = False,
    out: OutDir = Path("linearize-out/pretrain"),
    device: Device = "auto",
) -> None:
    """Pretrain a Mistral model with the linearity regulariser. Options override the preset
    (or YAML file) of --config; extra KEY=VALUE arguments override any field
    (model.hidden_size=256 lr=1e-3 ...)."""
    cfg = pretrain.load_config(config, list(ctx.args), **(given or {}))
    with step_progress() as (on_step, _):
        res = pretrain.pretrain(cfg, out=out, resume=resume, device=device, on_step=on_step)
    last = res["final"] or {}
    typer.echo(
        f"{res['steps']} steps, {res['tokens_seen']:,} tokens, {res['elapsed_s']} s; "
        f"held-out perplexity {last.get('perplexity', float('nan')):.2f}, mean linearity "
        f"{last.get('mean_linearity', float('nan')):.4f} (w/o residual "
        f"{last.get('mean_linearity_no_residual', float('nan')):.4f}); wrote {out}/final"
    )


@command("finetune")
@with_config(FinetuneConfig)
def finetune_command(
    model: Annotated[str, typer.Argument(help="model to fine-tune ('embedded' = SmolLM2)")],
    task: Annotated[
        str, typer.Option(help="a .jsonl task (boolq/cb/rte/wic fields or text/label)")
    ],
    config: FinetuneConfig | None = None,
    resume: Resume = False,
    out: OutDir = Path("linearize-out/finetune"),
    device: Device = "auto",
) -> None:
    """Fine-tune on a classification task (HF Trainer); compare with `linearize dynamics BASE OUT`."""
    name = None if model == "embedded" else model
    res = finetune.finetune(name, task, config, out=out, resume=resume, device=device)
    typer.echo(
        f"{res['steps']} steps on {res['task']}: held-out accuracy {res['accuracy_before']:.3f} "
        f"-> {res['accuracy_after']:.3f}; wrote {out}/final"
    )

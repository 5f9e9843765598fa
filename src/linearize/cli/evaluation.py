"""``linearize eval``, ``bench``, ``compare`` and ``report``: measuring models, and pages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from linearize._fields import str_list
from linearize.cli.runtime import Device, OutDir, command, fail, with_config
from linearize.errors import LinearizeError
from linearize.eval import bench, compare, suite
from linearize.eval.bench import BenchConfig
from linearize.eval.suite import EvalConfig
from linearize.report import render_dir


@command("bench")
@with_config(BenchConfig)
def bench_command(
    models: Annotated[
        list[str] | None, typer.Argument(help="models to compare; the first is the reference")
    ] = None,
    config: BenchConfig | None = None,
    out: OutDir = Path("linearize-out/bench"),
    labels: Annotated[str | None, typer.Option(help="comma-separated names for the table")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    device: Device = "auto",
) -> None:
    """Prefill and decode speed, time to first token, memory, parameters and size on disk of
    each model, measured interleaved in one process, with ratios to the first."""
    specs: list[str | None] = [
        None if m in ("embedded", "smollm2") else m for m in (models or ["embedded"])
    ]
    config.check()
    rows = bench.bench(
        specs,
        config,
        out=out,
        labels=str_list(labels) or None,
        dtype=dtype,
        device=device,
        on_round=lambda r: typer.echo(f"round {r}/{config.repeats} done", err=True),
    )
    typer.echo(bench.table_markdown(rows))
    typer.echo(f"wrote {out}/bench.json, bench.csv, bench.md, bench.png, bench.html")


@command("eval")
@with_config(EvalConfig)
def eval_command(
    models_: Annotated[
        list[str],
        typer.Argument(metavar="MODEL...", help="models or checkpoint dirs; 'embedded' = SmolLM2"),
    ],
    config: EvalConfig | None = None,
    device: Device = "auto",
    out: Annotated[
        Path, typer.Option(help="output directory (one subdirectory per model when several)")
    ] = Path("linearize-out/eval"),
) -> None:
    """Perplexity, lm-eval tasks, per-layer linear probing and an LLM judge; writes results.json."""
    cfg = config
    for name in models_:
        where = out if len(models_) == 1 else out / Path(name).name
        label = None if name == "embedded" else name
        try:
            res = suite.evaluate_model(
                label,
                cfg,
                out=where,
                device=device,
                on_part=lambda p: typer.echo(f"  {p} done", err=True),
            )
        except LinearizeError as e:
            fail(f"{name}: {e} (finished parts are in {where}/results.json)")
        summary = [f"perplexity {res['perplexity']:.3f}"] if "perplexity" in res else []
        summary += [f"{t} {m}" for t, m in res.get("lm_eval", {}).items()]
        summary += [
            f"probe {t} best {max(r['accuracy'] for r in v):.3f}"
            for t, v in res.get("probe", {}).items()
        ]
        if "judge" in res:
            summary.append(f"judge overall {res['judge']['mean']['overall']:.2f}")
        if "speed" in res:
            summary.append(
                f"prefill {res['speed']['prefill_tok_s']:.0f} tok/s, decode "
                f"{res['speed']['decode_tok_s_b1']:.1f} tok/s"
            )
        typer.echo(f"{name}: " + "; ".join(summary) + f" -> {where}/results.json")


@command("compare")
def compare_command(
    dirs: Annotated[
        list[str], typer.Argument(metavar="DIR...", help="linearize eval output directories")
    ],
    labels: Annotated[
        str, typer.Option(help="comma-separated labels (default: directory names)")
    ] = "",
    out: OutDir = Path("linearize-out/compare"),
) -> None:
    """One table (CSV/Markdown) and one figure (PNG/HTML) across eval results."""
    compare.compare(dirs, out, labels=str_list(labels) or None)
    typer.echo(
        (out / "compare.md").read_text() + f"wrote {out}/compare.json, .csv, .md, .png, .html"
    )


@command("report")
def report_command(
    dirs: Annotated[
        list[Path],
        typer.Argument(metavar="DIR...", help="output directories of any linearize command"),
    ],
) -> None:
    """Rebuild the HTML page of each run from the JSON it wrote (e.g. a run of an older
    version): report.html, sweep.html, dynamics.html, compare.html or bench.html."""
    pages = [page for d in dirs for page in render_dir(d)]
    typer.echo("\n".join(f"wrote {p}" for p in pages))

"""The ``linearize`` command: a thin typer layer over the Python API.

Each command parses its options, calls the library, and turns a LinearizeError into one line
on stderr with exit code 2 (no traceback).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import signal
import sys
import threading
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from linearize._io import strict_json
from linearize.analyze import AnalyzeConfig, default_out_dir
from linearize.analyze import analyze as run_analyze
from linearize.errors import LinearizeError
from linearize.eval import bench as benchmark
from linearize.eval import compare as comparison
from linearize.eval import suite
from linearize.eval.bench import BenchConfig
from linearize.eval.suite import EvalConfig
from linearize.report import render_dir
from linearize.surgery import compress as compressing
from linearize.surgery import export as exporting
from linearize.surgery import prune as pruning
from linearize.surgery import sweep as sweeping
from linearize.surgery.compress import CompressConfig
from linearize.surgery.prune import PruneConfig
from linearize.train import distill as distillation
from linearize.train import dynamics as dyn
from linearize.train import finetune as finetuning
from linearize.train import pretrain as pretraining
from linearize.train.distill import DistillConfig
from linearize.train.finetune import FinetuneConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure how linear each layer of a transformer decoder is (Razzhigaev et al., 2024).",
    pretty_exceptions_enable=False,
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _is_argument(p: inspect.Parameter) -> bool:
    meta = getattr(p.annotation, "__metadata__", ())
    return any(isinstance(m, typer.models.ArgumentInfo) for m in meta)


def with_config(cls: type, name: str = "config") -> Callable:
    """Give a command one option per field of the dataclass ``cls`` (help, default and type
    from the field, see linearize._fields.option) and call it with ``name=cls(...)``: the
    fields are declared once, in the config."""

    def options() -> list[inspect.Parameter]:
        hints = typing.get_type_hints(cls)
        params = []
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            typ = f.metadata.get("cli", hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None  # lists: empty
            flags = [f.metadata["flag"]] if "flag" in f.metadata else []
            ann = Annotated[typ, typer.Option(*flags, help=f.metadata["help"])]
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann
                )
            )
        return params

    def decorate(fn: Callable) -> Callable:
        fields = options()
        own = [
            p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != name
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields}
            for f in dataclasses.fields(cls):
                if "parse" in f.metadata and f.name in values:
                    try:
                        values[f.name] = f.metadata["parse"](values[f.name])
                    except LinearizeError as e:
                        _fail(str(e))
            return fn(**kwargs, **{name: cls(**values)})

        # the command's arguments, then the config's options, then the command's own options
        args = [p for p in own if _is_argument(p)]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in args]
        command.__signature__ = inspect.Signature(args + fields + rest)
        return command

    return decorate


def command(*args: Any, **kwargs: Any) -> Callable:
    """``app.command`` plus what every command shares: quiet libraries, and a LinearizeError
    raised anywhere in it becomes one line on stderr and exit status 2."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*a: Any, **kw: Any) -> Any:
            _quiet_libraries()
            try:
                with _terminate_unwinds():
                    return fn(*a, **kw)
            except LinearizeError as e:
                _fail(str(e))
            except _Terminated as e:
                typer.echo(f"error: stopped by signal {e.signum} (SIGTERM)", err=True)
                raise typer.Exit(128 + e.signum) from None
            except KeyboardInterrupt:  # after the same unwinding, one line, not click's "Aborted!"
                typer.echo("error: stopped by signal 2 (SIGINT, Ctrl-C)", err=True)
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(run)

    return decorate


class _Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so ``except Exception`` lets it pass."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """Let SIGTERM (``kill``, a job scheduler's stop) unwind the command as Ctrl-C does, through
    every ``finally``: spilled calibration states, temporary files and the --out lock go, where
    the default action would end the process on the spot and leave them behind."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    """A warning at the command line is a message for the user, not a source location."""
    return f"warning: {message}\n"


def _init_distributed() -> tuple[int, int]:
    """Start a process group when launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def _lazy_task(bar, description: str, total: int | None = None):
    """Yield a function giving the bar's one task, starting the bar on its first call (so an
    error found before any work prints only its line); after an error a started bar is
    erased, so the error is the only line left."""
    task = None

    def get() -> int:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        return task

    try:
        yield get
    except BaseException:
        bar.live.transient = True
        raise
    finally:
        if task is not None:
            bar.stop()


@contextmanager
def _token_progress(total: int | None, enabled: bool, world: int):
    """A rich progress bar on stderr counting tokens; yields the per-batch callback.

    The bar appears with the first batch, so input refused before any work prints only its
    error line."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [
        TextColumn("[bold]tokens"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    bar = Progress(*cols, console=Console(stderr=True), transient=False)
    with _lazy_task(bar, "tokens", total) as task:
        yield lambda n: bar.advance(task(), n * world)


class _PlainLines:
    """Progress as plain lines on stderr, for a log file, where a live line never shows: one
    line when a new phase begins, then at most one every ``every`` seconds, and one at its
    end; each says the time since the start."""

    def __init__(self, every: float = 30.0) -> None:
        import time

        self.clock, self.every = time.monotonic, every
        self.start = self.last = self.clock()
        self.phase: str | None = None

    def __call__(self, what: str, done: int, total: int, phase: str | None = None) -> None:
        """``phase`` names what counts as one phase (default: ``what`` itself)."""
        now = self.clock()
        new, end = (phase or what) != self.phase, bool(total) and done >= total
        if not (new or end or now - self.last >= self.every):
            return
        self.phase, self.last = phase or what, now
        count = f" {done}/{total}" if total else ""
        mins, secs = divmod(int(now - self.start), 60)
        typer.echo(f"[{mins:d}:{secs:02d}] {what}{count}", err=True)


@contextmanager
def _phase_progress(enabled: bool):
    """For work made of many passes (prune): one rich line on stderr with what runs now, its
    batches done, and the time since the start; yields (on_progress, say), ``say`` printing
    a line above it. Nothing shows before the first phase, so an early error stays alone."""
    if not enabled:
        yield pruning.no_progress, lambda line: typer.echo(line, err=True)
        return
    if not sys.stderr.isatty():  # a log file (nohup, a scheduler): plain lines, now and then
        yield _PlainLines(), lambda line: typer.echo(line, err=True)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    cols = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    bar = Progress(*cols, TimeElapsedColumn(), console=Console(stderr=True))
    with _lazy_task(bar, "starting") as task:

        def on_progress(what: str, done: int, total: int) -> None:
            t = task()
            bar.update(t, description=what, completed=done)
            state = next(x for x in bar.tasks if x.id == t)
            state.total = total or None  # None: a phase of unknown length
            state.finished_time = None  # a phase's end is not the run's: the clock goes on

        yield on_progress, lambda line: bar.console.print(line, markup=False, highlight=False)


@command()
@with_config(AnalyzeConfig)
def analyze(
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
) -> None:
    """Score every decoder layer: linearity (with / without residual), cosine, angular distance,
    block influence. Writes linearity.json/.csv/.png and report.html into --out."""
    rank, world = _init_distributed()
    if world > 1 and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
    out_dir = default_out_dir(model) if out is None else out
    with _token_progress(config.tokens, progress and rank == 0, world) as on_batch:
        fields = dataclasses.asdict(config)
        report = run_analyze(model, out=out_dir, device=device, on_batch=on_batch, **fields)
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


@command()
@with_config(PruneConfig)
def prune(
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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    progress: Annotated[bool, typer.Option(help="show what runs now on stderr")] = True,
) -> None:
    """Remove the most linear layers and write a checkpoint that linearize.load reads
    (with --sweep: compare strategies × replacements over several counts)."""
    if config.layers is not None and config.strategy == "linear-greedy":
        config.strategy = "layers"
    if sweep is not None:
        with _phase_progress(progress) as (on_progress, say):
            args = (eval_data, eval_tokens, out, dtype, device, eval_ood, on_progress, say)
            _run_sweep(model, config, sweep, *args)
        return
    out = out or Path("linearize-out/pruned")
    with _phase_progress(progress) as (on_progress, say):

        def on_step(step: dict) -> None:
            say(f"removed layer {step['layer']} (score {step['score']})")

        rep = pruning.prune(
            model,
            config,
            eval_data=eval_data or None,
            eval_tokens=eval_tokens,
            out=out,
            dtype=dtype,
            device=device,
            on_step=on_step,
            ood_data=eval_ood,
            on_progress=on_progress,
        )
    _say_pruned(rep, out)


def _say_pruned(rep: dict, out: Path) -> None:
    more = ""
    if rep.get("perplexity_before_ood"):
        more = (
            f"; out of domain ({rep['ood_data']}) {rep['perplexity_before_ood']} -> "
            f"{rep['perplexity_after_ood']}"
        )
    if rep.get("reconstructed"):
        more += f"; refit the MLP output projections of layers {rep['reconstructed']}"
    if rep.get("reconstructed_attention"):
        more += f" and the attention output projections of {rep['reconstructed_attention']}"
    typer.echo(
        f"removed {rep['removed']} ({rep['strategy']}, replace={rep['replace']}); "
        f"perplexity {rep['perplexity_before']} -> {rep['perplexity_after']}{more}; wrote {out}"
    )


def _run_sweep(
    model, config, ks, eval_data, eval_tokens, out, dtype, device, ood, on_progress, say
) -> None:
    if not eval_data:
        raise LinearizeError("--sweep needs a held-out source (--eval)")
    out = out or Path("linearize-out/sweep")

    def on_row(r: dict) -> None:
        say(
            f"{r['strategy']} / {r['replace']} / k={r['k']}: perplexity "
            f"{r['perplexity'] or r['note']}"
        )

    rows = sweeping.sweep(
        model,
        config,
        ks,
        config.strategy,
        config.replace,
        eval_data,
        eval_tokens,
        out,
        dtype,
        device,
        on_row,
        ood,
        on_progress,
    )
    typer.echo(sweeping.table_markdown(rows))
    typer.echo(f"wrote {out}/sweep.json, sweep.csv, sweep.md, sweep.png, sweep.html")


@command("bench")
@with_config(BenchConfig)
def bench_(
    models: Annotated[
        list[str] | None, typer.Argument(help="models to compare; the first is the reference")
    ] = None,
    config: BenchConfig | None = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/bench"),
    labels: Annotated[str | None, typer.Option(help="comma-separated names for the table")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Prefill and decode speed, time to first token, memory, parameters and size on disk of
    each model, measured interleaved in one process, with ratios to the first."""
    specs: list[str | None] = [
        None if m in ("embedded", "smollm2") else m for m in (models or ["embedded"])
    ]
    config.check()
    rows = benchmark.bench(
        specs,
        config,
        out,
        _csv(labels) or None,
        dtype,
        device,
        lambda r: typer.echo(f"round {r}/{config.repeats} done", err=True),
    )
    typer.echo(benchmark.table_markdown(rows))
    typer.echo(f"wrote {out}/bench.json, bench.csv, bench.md, bench.png, bench.html")


@command()
def export(
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
    rep = exporting.export_gguf(model, gguf, outtype)
    typer.echo(
        f"wrote {rep['gguf']} ({rep['outtype']}, {rep['layers']} layers, "
        f"{rep['bytes'] / 2**20:.1f} MiB)"
    )


@command(context_settings={"allow_extra_args": False})
@with_config(DistillConfig)
def distill(
    student: Annotated[str, typer.Argument(help="a checkpoint written by linearize prune")],
    config: DistillConfig | None = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the last checkpoint in --out")
    ] = False,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/distilled"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Heal a pruned model: train its replacements against the original's hidden states."""
    with _step_progress() as on_step:
        res = distillation.distill(student, config, out, resume, device, on_step)
    typer.echo(
        f"{res['steps']} steps, {res['tokens_seen']:,} tokens, {res['elapsed_s']} s; "
        f"held-out perplexity {res['perplexity_before']} -> {res['perplexity_after']}; "
        f"wrote {out}/final"
    )


@command()
@with_config(CompressConfig)
def compress(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="[MODEL] [GROUP.KEY=VALUE ...]: the model (default: embedded SmolLM2), then "
            "options of the commands underneath, e.g. prune.tokens=65536 distill.lr=1e-3 "
            "bench.repeats=5"
        ),
    ] = None,
    config: CompressConfig | None = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/compressed"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    progress: Annotated[bool, typer.Option(help="show what runs now on stderr")] = True,
) -> None:
    """Cut, heal and export in one resumable run: a stock checkpoint (OUT/model), its GGUF
    (OUT/model.gguf), and quality against speed (OUT/compress.json, compress.html)."""
    items = args or []
    models_given = [a for a in items if "=" not in a]
    if len(models_given) > 1:
        raise LinearizeError(f"one model at a time, got {', '.join(models_given)}")
    model = models_given[0] if models_given else None
    with _phase_progress(progress) as (on_progress, say):
        rec = compressing.compress(
            model,
            config,
            overrides=[a for a in items if "=" in a],
            out=out,
            device=device,
            on_progress=on_progress,
            say=say,
        )
    typer.echo(compressing.summary_line(rec, out))


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@command("eval")
@with_config(EvalConfig)
def eval_(
    models_: Annotated[
        list[str],
        typer.Argument(metavar="MODEL...", help="models or checkpoint dirs; 'embedded' = SmolLM2"),
    ],
    config: EvalConfig | None = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
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
                label, cfg, where, device, on_part=lambda p: typer.echo(f"  {p} done", err=True)
            )
        except LinearizeError as e:
            _fail(f"{name}: {e} (finished parts are in {where}/results.json)")
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


@command()
def compare(
    dirs: Annotated[
        list[str], typer.Argument(metavar="DIR...", help="linearize eval output directories")
    ],
    labels: Annotated[
        str, typer.Option(help="comma-separated labels (default: directory names)")
    ] = "",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/compare"),
) -> None:
    """One table (CSV/Markdown) and one figure (PNG/HTML) across eval results."""
    comparison.compare(dirs, out, _csv(labels) or None)
    typer.echo(
        (out / "compare.md").read_text() + f"wrote {out}/compare.json, .csv, .md, .png, .html"
    )


@command()
def report(
    dirs: Annotated[
        list[Path],
        typer.Argument(metavar="DIR...", help="output directories of any linearize command"),
    ],
) -> None:
    """Rebuild the HTML page of each run from the JSON it wrote (e.g. a run of an older
    version): report.html, sweep.html, dynamics.html, compare.html or bench.html."""
    pages = [page for d in dirs for page in render_dir(d)]
    typer.echo("\n".join(f"wrote {p}" for p in pages))


@command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def pretrain(
    ctx: typer.Context,
    config: Annotated[str, typer.Option(help="tiny | 150m | 650m | FILE.yaml")] = "tiny",
    data: Annotated[
        str | None,
        typer.Option(help="training sources, comma-separated (e.g. roneneldan/TinyStories)"),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer name or dir (default: the embedded SmolLM2's)")
    ] = None,
    reg: Annotated[str | None, typer.Option(help="cosine | mse | none")] = None,
    reg_weight: Annotated[float | None, typer.Option(help="λ, the regulariser's weight")] = None,
    tokens: Annotated[int | None, typer.Option(help="training tokens")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    probe_every: Annotated[int | None, typer.Option(help="steps between linearity probes")] = None,
    save_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the last checkpoint in --out")
    ] = False,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/pretrain"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Pretrain a Mistral model with the linearity regulariser. Extra KEY=VALUE arguments
    override the config (model.hidden_size=256 lr=1e-3 ...)."""
    cfg = pretraining.load_config(
        config,
        list(ctx.args),
        data=data,
        tokenizer=tokenizer,
        reg=reg,
        reg_weight=reg_weight,
        tokens=tokens,
        seed=seed,
        probe_every=probe_every,
        save_every=save_every,
    )
    with _step_progress() as on_step:
        res = pretraining.pretrain(cfg, out, resume, device, on_step)
    last = res["final"] or {}
    typer.echo(
        f"{res['steps']} steps, {res['tokens_seen']:,} tokens, {res['elapsed_s']} s; "
        f"held-out perplexity {last.get('perplexity', float('nan')):.2f}, mean linearity "
        f"{last.get('mean_linearity', float('nan')):.4f} (w/o residual "
        f"{last.get('mean_linearity_no_residual', float('nan')):.4f}); wrote {out}/final"
    )


@command()
def dynamics(
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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/dynamics"),
) -> None:
    """Linearity across a series of checkpoints: dynamics.json/.csv/.md/.png/.html."""
    rows = dyn.dynamics(
        checkpoints,
        data,
        tokens,
        seq_len,
        batch_size,
        out,
        dtype,
        device,
        on_row=lambda r: typer.echo(f"  step {r['step']}: {r['mean_linearity']:.4f}", err=True),
    )
    typer.echo(dyn.table_markdown(rows) + f"wrote {out}/dynamics.json, .csv, .md, .png, .html")


@command()
@with_config(FinetuneConfig)
def finetune(
    model: Annotated[str, typer.Argument(help="model to fine-tune ('embedded' = SmolLM2)")],
    task: Annotated[
        str, typer.Option(help="a .jsonl task (boolq/cb/rte/wic fields or text/label)")
    ],
    config: FinetuneConfig | None = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the last checkpoint in --out")
    ] = False,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("linearize-out/finetune"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Fine-tune on a classification task (HF Trainer); compare with `linearize dynamics BASE OUT`."""
    name = None if model == "embedded" else model
    res = finetuning.finetune(name, task, config, out, resume, device)
    typer.echo(
        f"{res['steps']} steps on {res['task']}: held-out accuracy {res['accuracy_before']:.3f} "
        f"-> {res['accuracy_after']:.3f}; wrote {out}/final"
    )


@contextmanager
def _step_progress():
    """A rich progress line on stderr showing the step and the latest losses (from the first
    step on: an error found before it prints only its line)."""
    if not sys.stderr.isatty():  # a log file: plain lines, now and then
        lines = _PlainLines()
        yield lambda row: lines(f"step {row['step']}: {_losses(row)}", 0, 0, "steps")
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with _lazy_task(bar, "starting") as task:

        def on_step(row: dict) -> None:
            bar.update(task(), description=f"step {row['step']}: {_losses(row)}")

        yield on_step


def _losses(row: dict) -> str:
    return " ".join(
        f"{k} {v:.4g}"
        for k, v in row.items()
        if k not in ("step", "tokens") and isinstance(v, float)
    )


@app.callback()
def _root() -> None:
    """linearize: per-layer linearity of decoder LMs, and pruning, healing and pretraining."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

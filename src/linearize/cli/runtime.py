"""What every ``linearize`` command shares: the typer app, the ``command`` decorator (quiet
libraries, signals that unwind, one error line and exit status 2), options built from config
dataclasses (``with_config``), and the distributed start-up."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import signal
import threading
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from linearize._fields import choices_of
from linearize.errors import LinearizeError, memory_errors

# options many commands share, declared once
Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
OutDir = Annotated[Path, typer.Option(help="output directory")]
Resume = Annotated[bool, typer.Option(help="continue from the last checkpoint in --out")]
ShowProgress = Annotated[bool, typer.Option(help="show what runs now on stderr")]
DryRun = Annotated[
    bool,
    typer.Option(
        help="print what the run will need (peak RAM, disk, passes; time when the weights are "
        "here) from the model's config, and stop"
    ),
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure how linear each layer of a transformer decoder is (Razzhigaev et al., 2024).",
    pretty_exceptions_enable=False,
)


def fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _is_argument(p: inspect.Parameter) -> bool:
    meta = getattr(p.annotation, "__metadata__", ())
    return any(isinstance(m, typer.models.ArgumentInfo) for m in meta)


def with_config(cls: type, name: str = "config", given_only: bool = False) -> Callable:
    """Give a command one option per field of the dataclass ``cls`` (help, default and type
    from the field, see linearize._fields.option) and call it with ``name=cls(...)``: the
    fields are declared once, in the config. With ``given_only`` the options default to
    unset and the command gets ``name={field: value}`` of those given, for configs built from
    a preset that the options then override (``pretrain``)."""

    def options() -> list[inspect.Parameter]:
        hints = typing.get_type_hints(cls)
        params = []
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            typ = f.metadata.get("cli", hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None  # lists: empty
            if given_only:
                typ, default = typ | None, None
            flags = [f.metadata["flag"]] if "flag" in f.metadata else []
            help_ = f.metadata["help"]
            if "choices" in f.metadata:
                help_ += f": {' | '.join(choices_of(f))}"
            panel = f.metadata.get("panel")
            ann = Annotated[typ, typer.Option(*flags, help=help_, rich_help_panel=panel)]
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
                        fail(str(e))
            if given_only:
                return fn(**kwargs, **{name: {k: v for k, v in values.items() if v is not None}})
            return fn(**kwargs, **{name: cls(**values)})

        # the command's arguments, then the config's options, then the command's own options
        args = [p for p in own if _is_argument(p)]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in args]
        command.__signature__ = inspect.Signature(args + fields + rest)
        return command

    return decorate


# what any command can lower when it runs out of memory (prune names its own flags too)
_LESS_MEMORY = "lower --tokens, --batch-size or --seq-len, or use --dtype bfloat16"


def command(*args: Any, **kwargs: Any) -> Callable:
    """``app.command`` plus what every command shares: quiet libraries, and a LinearizeError
    raised anywhere in it becomes one line on stderr and exit status 2."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*a: Any, **kw: Any) -> Any:
            _quiet_libraries()
            try:
                with _terminate_unwinds(), memory_errors(_LESS_MEMORY):
                    return fn(*a, **kw)
            except LinearizeError as e:
                fail(str(e))
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


def init_distributed() -> tuple[int, int]:
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

"""Progress on stderr: rich live lines on a terminal, plain timed lines in a log file (nohup,
a scheduler), nothing before the first unit of work (so an early error stays alone)."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager

import typer

from linearize.surgery.prune import no_progress


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
def token_progress(total: int | None, enabled: bool, world: int):
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


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class PlainLines:
    """Progress as plain lines on stderr, for a log file, where a live line never shows: one
    line when a new phase begins, then at most one every ``every`` seconds, and one at its
    end; each says the time since the start. A phase is its text without numbers, so a loss
    or a layer range that changes with every step does not make each step a phase."""

    def __init__(self, every: float = 30.0) -> None:
        import time

        self.clock, self.every = time.monotonic, every
        self.start = self.last = self.clock()
        self.phase: str | None = None

    def __call__(self, what: str, done: int, total: int, phase: str | None = None) -> None:
        """``phase`` names what counts as one phase (default: ``what`` without its numbers)."""
        now = self.clock()
        phase = phase or _NUMBER.sub("#", what)
        new, end = phase != self.phase, bool(total) and done >= total
        if not (new or end or now - self.last >= self.every):
            return
        self.phase, self.last = phase, now
        count = f" {done}/{total}" if total else ""
        mins, secs = divmod(int(now - self.start), 60)
        typer.echo(f"[{mins:d}:{secs:02d}] {what}{count}", err=True)


@contextmanager
def phase_progress(enabled: bool):
    """For work made of many passes (prune): one rich line on stderr with what runs now, its
    batches done, and the time since the start; yields (on_progress, say), ``say`` printing
    a line above it. Nothing shows before the first phase, so an early error stays alone."""
    if not enabled:
        yield no_progress, lambda line: typer.echo(line, err=True)
        return
    if not sys.stderr.isatty():  # a log file (nohup, a scheduler): plain lines, now and then
        yield PlainLines(), lambda line: typer.echo(line, err=True)
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


@contextmanager
def step_progress():
    """A rich progress line on stderr showing the step and the latest losses (from the first
    step on: an error found before it prints only its line). Yields ``(on_step, on_progress)``:
    ``on_progress`` shows the work before the first step (text sampled from the teacher)."""
    if not sys.stderr.isatty():  # a log file: plain lines, now and then
        lines = PlainLines()
        yield (lambda row: lines(f"step {row['step']}: {_losses(row)}", 0, 0, "steps")), lines
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

        def on_progress(what: str, done: int, total: int) -> None:
            count = f" {done}/{total}" if total else ""
            bar.update(task(), description=f"{what}{count}")

        yield on_step, on_progress


def _losses(row: dict) -> str:
    return " ".join(
        f"{k} {v:.4g}"
        for k, v in row.items()
        if k not in ("step", "tokens") and isinstance(v, float)
    )

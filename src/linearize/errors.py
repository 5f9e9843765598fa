"""The one exception type the CLI turns into a one-line message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class LinearizeError(Exception):
    """Bad input or an unsupported situation, explained in one line for the user."""


_OOM = ("can't allocate memory", "out of memory", "not enough memory", "Cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, or torch's allocator (CPU or CUDA),
    which raises a RuntimeError (``torch.OutOfMemoryError`` is one) with its own words."""
    return isinstance(e, MemoryError) or (
        isinstance(e, (RuntimeError, OSError)) and any(w in str(e) for w in _OOM)
    )


@contextmanager
def memory_errors(hint: str) -> Iterator[None]:
    """Turn running out of memory mid-run (a process or cgroup limit the plan could not see,
    another program taking RAM) into one line that says which flags need less."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e) or isinstance(e, LinearizeError):
            raise
        raise LinearizeError(f"out of memory ({first_line(e)[:120]}): {hint}") from None


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message: what a one-line error can show."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__

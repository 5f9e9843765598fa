"""Atomic file writes: a crash never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from linearize.errors import LinearizeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """Build a directory with ``write(tmp)`` in a temporary sibling, then rename it into place,
    so readers see the old directory or the complete new one, never a half-written one.

    With ``overwrite`` False an existing ``path`` wins: another process got there first.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if overwrite and path.exists():
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if overwrite or not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def previous_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run's ``{"settings", "rows"}`` JSON, if it used the same settings:
    what a resumed sweep or series may skip. A missing or broken file means none."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(old, dict) or old.get("settings") != settings:
        return []
    return list(old.get("rows", []))


def check_writable_dir(out: Path) -> None:
    """Fail early, before any work, if ``out`` cannot become a writable directory."""
    out = Path(out).absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LinearizeError(f"cannot write to '{out}': '{probe}' is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LinearizeError(f"cannot write to '{out}': '{probe}' is not writable")

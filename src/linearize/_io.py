"""Files and output directories: atomic writes, strict JSON, and one claim per ``--out``.

A crash or a kill never leaves a half-written result: every file is written beside its place
and renamed into it. Before any work, a command claims its output directory: it proves the
directory can be written (by writing into it: permission bits do not stop root, /proc does)
and locks it, so two runs never interleave their files.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from linearize.errors import LinearizeError

TMP_PREFIX = ".lz-tmp."  # what a killed write leaves behind; swept when the directory is claimed
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, also when a library (safetensors, matplotlib) wrapped it in its own error."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


@contextmanager
def space_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if _disk_full(e):
            raise LinearizeError(
                f"no space left on the device while writing '{path}'; earlier outputs are unchanged"
            ) from None
        raise


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{TMP_PREFIX}{path.name}.", suffix=path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        with space_errors(path):
            write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """Build a directory with ``write(tmp)`` in a temporary sibling, then rename it into place,
    so readers see the old directory or the complete new one, never a half-written one.

    With ``overwrite`` False an existing ``path`` wins: another process got there first. A
    ``path`` that is a symbolic link is written through: its target is replaced, the link stays.
    """
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
    try:
        with space_errors(path):
            write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if overwrite and path.exists():
            _swap_in(tmp, path)
            return
        try:
            os.replace(tmp, path)
        except OSError:
            if overwrite or not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace the directory ``path`` by ``tmp``: the old one is renamed aside first, so a kill
    at any point leaves the old or the new directory under ``path`` (or, for an instant, the
    old one under a temporary name, swept on the next claim), never a mix."""
    old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-old-", dir=path.parent))
    os.replace(path, old / "d")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _strict(obj: Any, where: str, undefined: list[str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        undefined.append(where or "value")
        return None
    if isinstance(obj, dict):
        return {
            k: _strict(v, f"{where}.{k}" if where else str(k), undefined) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{where}[{i}]", undefined) for i, v in enumerate(obj)]
    return obj


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """JSON that every parser reads (no NaN/Infinity): a non-finite number becomes null, and a
    top-level dict says which fields are null and why under ``"undefined"``."""
    undefined: list[str] = []
    clean = _strict(obj, "", undefined)
    if undefined and isinstance(clean, dict):
        clean["undefined"] = {
            "fields": undefined,
            "why": "null marks a value that is not defined for this input (e.g. a score of a "
            "state with zero variance) or that overflowed",
        }
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, strict_json(obj) + "\n")


def previous_json(path: Path) -> dict:
    """An earlier run's JSON object at ``path``, what a resumed run may reuse; a missing,
    broken (e.g. killed before the atomic write existed) or non-object file gives {}."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return old if isinstance(old, dict) else {}


def previous_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run's ``{"settings", "rows"}`` JSON, if it used the same settings:
    what a resumed sweep or series may skip. A missing or broken file means none."""
    old = previous_json(path)
    return list(old.get("rows", [])) if old.get("settings") == settings else []


# --- claiming an output directory -------------------------------------------------------------


class _Claim:
    def __init__(self, created: list[Path], lock: Path, fd: int) -> None:
        self.created, self.lock, self.fd, self.depth = created, lock, fd, 1


_claims: dict[Path, _Claim] = {}


def _probe(out: Path) -> list[Path]:
    """Create ``out`` and write a file into it; returns the directories that were created."""
    created, p = [], out
    while not p.exists():
        created.append(p)
        p = p.parent
    if not p.is_dir():
        raise LinearizeError(f"cannot write to '{out}': '{p}' is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe.", dir=out)
        try:
            os.write(fd, b"linearize")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        _remove_empty(created)
        if _disk_full(e):
            raise LinearizeError(f"cannot write to '{out}': no space left on the device") from None
        raise LinearizeError(f"cannot write to '{out}': {e.strerror or e}") from None
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return


def real_path(path: str | Path) -> Path:
    """``path`` absolute, ``~`` expanded and symbolic links resolved: where a write lands."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _open_lock(lock: Path) -> int:
    """Open (or create) the lock file itself, never what a link planted at its name points to."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinearizeError(
                f"'{lock}' is a symbolic link; linearize does not follow links at its lock "
                "files: remove it"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LinearizeError(f"'{lock}' is not a regular file; remove it")
    return fd


def _lock(out: Path, inside: bool = False) -> tuple[Path, int]:
    """An flock on ``.<name>.lock`` beside ``out`` (``inside``: in it, where its parent cannot
    be written, as for a mount point): the kernel drops it when a run dies, so a crash never
    leaves the directory locked."""
    lock = out / ".linearize.lock" if inside else out.parent / f".{out.name}.lock"
    while True:
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LinearizeError(
                f"'{out}' is in use by another linearize run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not unlinked by a finishing run between our open and our flock
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return lock, fd


def _sweep_debris(out: Path, file: bool) -> None:
    """Remove what killed writes of ``out`` left: its temporary siblings and, for a directory,
    the temporary files inside it (nobody else writes there while we hold the lock)."""
    found = list(out.parent.glob(f"{TMP_PREFIX}{out.name}[-.]*"))
    if not file:
        found += sorted(out.rglob(f"{TMP_PREFIX}*"), key=lambda p: len(p.parts))
    for p in found:  # outermost first; what an rmtree already took is gone
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


Models = str | Path | None | list[str | Path | None]


def _refuse_model_dir(out: Path, models: Models, whole: bool) -> None:
    """``out`` may not be an input model's directory or lie inside it (a checkpoint written
    there overwrites the model it was made from); with ``whole`` (``out`` is replaced as one
    directory) a model may not lie inside ``out`` either."""
    for model in models if isinstance(models, list) else [models]:
        if model is None or not str(model) or not Path(model).expanduser().is_dir():
            continue
        src = real_path(model)
        if out == src or src in out.parents or (whole and out in src.parents):
            raise LinearizeError(
                f"--out '{out}' {'is' if out == src else 'overlaps'} the input model's "
                f"directory '{src}': choose an --out outside it (linearize never writes into "
                "its input)"
            )


def _refuse_foreign(out: Path, marker: str) -> None:
    """A directory that will be replaced whole must be empty, or one this command wrote
    (``marker`` in it): never delete what linearize did not write."""
    if not out.is_dir() or (out / marker).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX))
    foreign = [n for n in foreign if n != ".linearize.lock"]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise LinearizeError(
            f"--out '{out}' holds files that linearize did not write ({shown}) and this "
            f"command replaces its --out whole: choose a new or empty directory"
        )


def claim_output(
    out: str | Path,
    file: bool = False,
    model: Models = None,
    replaces: str | None = None,
) -> Path:
    """Before any work: prove ``out`` can be written and lock it for this run (re-entrant).
    ``file``: ``out`` is one file (its directory is probed, the file itself is locked).
    ``model``: the input model (or models), which ``out`` may not overlap. ``replaces``: ``out`` will be
    replaced whole, so it must be new, empty or hold this file (the record of an earlier run).
    A symbolic link at ``out`` is written through. Returns ``out``, resolved.

    Released by :func:`releases_output` around the public function that claimed it, or by the
    kernel when the process dies. In a distributed run only rank 0 writes and claims.
    """
    out = real_path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        return out
    if out in _claims:
        _claims[out].depth += 1
        return out
    if file and out.is_dir():
        raise LinearizeError(f"cannot write to '{out}': it is a directory")
    _refuse_model_dir(out, model, whole=replaces is not None)
    if replaces is not None:
        _refuse_foreign(out, replaces)
    created = _probe(out.parent if file else out)
    try:
        lock, fd = _lock_somewhere(out, inside_ok=not file and replaces is None)
    except LinearizeError:
        _remove_empty(created)
        raise
    _claims[out] = _Claim(created, lock, fd)
    _sweep_debris(out, file)
    return out


def _release(out: Path, failed: bool) -> None:
    claim = _claims[out]
    claim.depth -= 1
    if claim.depth:
        return
    del _claims[out]
    claim.lock.unlink(missing_ok=True)  # while still holding it: see the inode check in _lock
    os.close(claim.fd)
    if failed:  # a run that wrote nothing leaves nothing, not even the directory
        _remove_empty(claim.created)


def _lock_somewhere(out: Path, inside_ok: bool) -> tuple[Path, int]:
    """The lock beside ``out``; where its parent cannot be written (``out`` a mount point in a
    read-only directory), inside ``out`` if the command writes only into it, else one line."""
    try:
        return _lock(out)
    except OSError as e:
        if inside_ok and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            try:
                return _lock(out, inside=True)
            except OSError as e2:
                e = e2
        msg = (
            f"cannot write to '{out}': cannot create its lock in '{out.parent}' ({e.strerror or e})"
        )
        if not inside_ok:
            msg += "; this command builds its output beside it: choose a directory inside it"
        raise LinearizeError(msg) from None


F = TypeVar("F", bound=Callable[..., Any])


def releases_output(fn: F) -> F:
    """Release the output claims ``fn`` made, however it ends."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = {p: c.depth for p, c in _claims.items()}
        failed = True
        try:
            result = fn(*args, **kwargs)
            failed = False
            return result
        finally:
            for p in list(_claims):
                for _ in range(_claims[p].depth - before.get(p, 0)):
                    _release(p, failed)

    return wrapper  # type: ignore[return-value]

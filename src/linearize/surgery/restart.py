"""Restarting a forward pass in the middle of the decoder stack, from stored boundary states.

Greedy pruning changes nothing upstream of a cut, so after a removal at position p only layers
p, p+1, … need to run again. ``BoundaryStore`` keeps, for every calibration batch, the residual
stream at chosen layer boundaries (boundary j = the input of layer j before any replacement
bridge there; boundary n = the output of the last layer), in RAM up to a budget and spilled to
disk as safetensors beyond it. ``run_from`` runs the body from boundary ``start`` on: the layers
before it are taken out for the duration (``arch.layers_removed``, which keeps masks and
per-layer config consistent) and the stored state replaces whatever the embedding produced,
before any bridge at ``start`` sees it, so the result is the very forward a full pass would
have done.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from linearize import arch
from linearize._io import space_errors
from linearize.hooks import StopForward, eval_mode, hooks, layer_input, layer_output

SPILL_PREFIX = "linearize-states-"


_SPILL_LOCK = ".lock"  # flocked by the run that owns the directory, for as long as it lives


def _owner_alive(d: Path) -> bool:
    """Whether a run still owns the spill directory ``d``: its lock file is flocked. The
    kernel drops the lock when the run dies however it dies, and sees it from every PID
    namespace (another container, a shared disk's other client), where a pid would not tell.
    A directory without a lock file (a run just starting, or an older linearize) is left."""
    try:
        fd = os.open(d / _SPILL_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_orphans(root: Path) -> list[Path]:
    """Delete the spill directories under ``root`` whose run is gone (nothing holds their
    lock): a run killed outright (SIGKILL, the OOM killer) cannot clean up after itself, and
    its states can be gigabytes. Returns what was removed."""
    gone = []
    for d in root.glob(f"{SPILL_PREFIX}*-*"):
        if d.is_dir() and not d.is_symlink() and not _owner_alive(d):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _own_spill_dir(root: Path) -> tuple[Path, int]:
    """A new spill directory under ``root``, locked by this run until :meth:`close`."""
    d = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=root))
    fd = os.open(d / _SPILL_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return d, fd


class BoundaryStore:
    """Tensors keyed by (name, batch index): RAM up to ``ram_bytes``, then safetensors files."""

    def __init__(self, ram_bytes: int = 4 << 30, spill_dir: str | Path | None = None) -> None:
        self.ram_bytes = ram_bytes
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill: Path | None = None
        self._spill_fd: int | None = None  # the flock that says this run owns _spill
        self._ram: dict[tuple, Tensor] = {}
        self._disk: dict[tuple, Path] = {}
        self._disk_size: dict[tuple, int] = {}
        self.in_ram = 0  # bytes held in RAM now
        self.peak_ram = 0
        self.spilled = 0  # bytes written to disk, in all
        self.on_disk = 0  # bytes on disk now
        self.peak_disk = 0

    def __contains__(self, key: tuple) -> bool:
        return key in self._ram or key in self._disk

    def put(self, key: tuple, t: Tensor) -> None:
        self.drop(key)
        t = t.detach()
        size = t.numel() * t.element_size()
        if self.in_ram + size <= self.ram_bytes:
            self._ram[key] = t
            self.in_ram += size
            self.peak_ram = max(self.peak_ram, self.in_ram)
            return
        if self._spill is None:
            root = Path(self._spill_root or tempfile.gettempdir())
            remove_orphans(root)
            self._spill, self._spill_fd = _own_spill_dir(root)
        path = self._spill / ("_".join(map(str, key)) + ".safetensors")
        with space_errors(path):  # the cache's own spill: say so in one line, not a traceback
            save_file({"h": t.contiguous().cpu()}, str(path))
        self._disk[key] = path
        self._disk_size[key] = size
        self.spilled += size
        self.on_disk += size
        self.peak_disk = max(self.peak_disk, self.on_disk)

    def get(self, key: tuple, device: torch.device | None = None) -> Tensor:
        if key in self._ram:
            t = self._ram[key]
        else:
            t = load_file(str(self._disk[key]))["h"]
        return t if device is None else t.to(device)

    def drop(self, key: tuple) -> None:
        t = self._ram.pop(key, None)
        if t is not None:
            self.in_ram -= t.numel() * t.element_size()
        path = self._disk.pop(key, None)
        if path is not None:
            self.on_disk -= self._disk_size.pop(key, 0)
            path.unlink(missing_ok=True)

    def drop_where(self, pred: Callable[[tuple], bool]) -> None:
        for key in [k for k in (*self._ram, *self._disk) if pred(k)]:
            self.drop(key)

    def close(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self._disk_size.clear()
        self.in_ram = self.on_disk = 0
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _layer_range(model: nn.Module, start: int, stop: int, have_state: bool) -> list[nn.Module]:
    _, layers = arch.get_layers(model)
    if not 0 <= start < stop <= len(layers):
        raise ValueError(f"bad layer range [{start}, {stop}) for {len(layers)} layers")
    if start > 0 and not have_state:
        raise ValueError("a restart after layer 0 needs the state at its boundary")
    return [layers[i] for i in range(start, stop)]


@contextlib.contextmanager
def starting_at(model: nn.Module, start: int, state: Callable[[], Tensor]) -> Iterator[None]:
    """Forward passes inside the block skip layers [0, start) and give layer ``start`` (before
    any bridge, or any pre-hook already on it) a copy of ``state()`` instead of what the
    embedding made: for a prefix whose output is already known. Gradients flow as usual from
    layer ``start`` on; the copy keeps ``state()``'s tensor safe from in-place changes."""
    _, layers = arch.get_layers(model)
    first = layers[start]

    def feed(module, args, kwargs):
        h = layer_input(args, kwargs)
        return _with_hidden(args, kwargs, state().to(device=h.device, dtype=h.dtype).clone())

    cut = arch.layers_removed(model, range(start)) if start > 0 else contextlib.nullcontext()
    with cut, hooks(pre=[(first, feed)], prepend=True):
        yield


@torch.no_grad()
def run_from(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    start: int,
    stop: int,
    state_at_start: Callable[[int], Tensor] | None,
    on_boundary: Callable[[int, int, Tensor], None] | None = None,
    more_hooks: Callable[[list[nn.Module]], list[tuple[nn.Module, Callable]]] | None = None,
    before_batch: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> None:
    """Run layers [start, stop) (current numbering) on every batch.

    ``state_at_start(b)`` gives batch b's stream entering layer ``start`` (None: start must be
    0, and the embedding's output is used). ``on_boundary(b, j, h)`` receives the raw stream at
    boundary j for start ≤ j ≤ stop (j = start is the state fed in; j > start is layer j−1's
    output). ``more_hooks(layers)`` returns more (module, forward hook) pairs to put on for the
    pass; every hook is removed on exit, whatever happens. The pass stops after layer stop−1: the final norm
    and the LM head never run.
    """
    running = _layer_range(model, start, stop, state_at_start is not None)
    body = arch.get_body(model)
    device = arch.input_device(model)
    current = {"b": 0}

    def at_start(module, args, kwargs):
        if on_boundary is not None:
            on_boundary(current["b"], start, layer_input(args, kwargs))

    def out_hook(j: int):
        def hook(module, args, kwargs, out):
            if on_boundary is not None:
                on_boundary(current["b"], j, layer_output(out))
            if j == stop:
                raise StopForward

        return hook

    fed = (
        starting_at(model, start, lambda: state_at_start(current["b"]))
        if state_at_start is not None
        else contextlib.nullcontext()
    )
    extra = more_hooks(running) if more_hooks is not None else []
    outs = [(layer, out_hook(start + i + 1)) for i, layer in enumerate(running)]
    with (
        eval_mode(model),
        hooks(pre=[(running[0], at_start)], prepend=True),
        fed,  # entered second, so its feed goes in front: at_start sees the state fed in
        hooks(post=extra + outs),
    ):
        for b, batch in enumerate(batches):
            current["b"] = b
            if before_batch is not None:
                before_batch(b, batch)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            try:
                body(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass

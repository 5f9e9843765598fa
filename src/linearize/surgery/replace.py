"""What stands in for removed layers, and checkpoints that carry it.

Two kinds of replacement for a run of removed layers [start, end):

- ``linear``: an affine map on the residual stream, ``h ↦ h @ W + b``. It is not inserted into
  the layer list, where every architecture's forward, mask selection and KV cache expect real
  decoder layers. It sits at the *input* of the next kept module (the next decoder layer, or
  the final norm when the run ended the stack) as a submodule named ``linearize_bridge``,
  applied by a forward pre-hook (see linearize.surgery._remote_modeling). The model stays a stock
  architecture with fewer layers plus the bridge tensors; ``config.linearize`` records where
  they go, ``load`` puts them back, and the shipped ``modeling_linearize.py`` lets
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` do the same.
- ``fold`` (ReplaceMe): a map T on the MLP output of layer start−1, multiplied into that
  layer's output projection. Nothing extra remains: a plain checkpoint with fewer layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from linearize import arch, offload
from linearize.errors import LinearizeError
from linearize.stats import AffineMap
from linearize.surgery import _remote_modeling
from linearize.surgery._remote_modeling import BRIDGE, AffineBridge, attach_bridge

REMOTE_FILE = "modeling_linearize.py"


def as_affine(bridge: AffineBridge) -> AffineMap:
    """A float64 copy of a bridge's map, for composing."""
    return AffineMap(weight=bridge.weight.detach().double(), bias=bridge.bias.detach().double())


def bridge_target(model: nn.Module, position: int) -> nn.Module:
    """The module whose input a bridge at ``position`` (an index in the current layer list,
    or len(layers) for 'after the last layer') transforms."""
    _, layers = arch.get_layers(model)
    if position < len(layers):
        return layers[position]
    norm = arch.get_final_norm(model)
    if norm is None:
        raise LinearizeError(
            "cannot replace the last layers: no final norm is known for this model"
        )
    return norm


def get_bridge(model: nn.Module, position: int) -> AffineBridge | None:
    return getattr(bridge_target(model, position), BRIDGE, None)


def ensure_bridge(model: nn.Module, position: int) -> AffineBridge:
    """The bridge at ``position``, created as the identity if absent (on the device its
    target computes on; an offloaded target is made resident, so the bridge stays)."""
    return _attach(model, bridge_target(model, position))


def _attach(model: nn.Module, target: nn.Module) -> AffineBridge:
    """The bridge at ``target``'s input (created as the identity if absent), in the model's
    dtype, on the device ``target`` computes on, which is made resident if offloaded."""
    offload.resident_(model, target)
    dtype = next(model.parameters()).dtype
    where = offload.execution_device(model, target)
    return attach_bridge(target, model.config.hidden_size, dtype, where)


def bridge_positions(model: nn.Module) -> list[int]:
    _, layers = arch.get_layers(model)
    return [p for p in range(len(layers) + 1) if _has_bridge(model, p)]


def _has_bridge(model: nn.Module, position: int) -> bool:
    try:
        return get_bridge(model, position) is not None
    except LinearizeError:
        return False


def replace_span_(model: nn.Module, start: int, end: int, fit: AffineMap | None) -> None:
    """Remove layers [start, end) (current numbering); ``fit`` None drops them, else the
    fitted map stands in for them. Bridges already around the run compose into one:
    input bridge → this map → output bridge, placed at the next kept module."""
    before, after = get_bridge(model, start), get_bridge(model, end)
    maps = [
        as_affine(before) if before is not None else None,
        fit,
        as_affine(after) if after is not None else None,
    ]
    maps = [m for m in maps if m is not None]
    arch.remove_layers_(model, range(start, end))  # the input bridge goes with its layer
    if maps:
        set_bridge_(model, start, functools.reduce(AffineMap.then, maps))


@torch.no_grad()
def set_bridge_(model: nn.Module, position: int, fit: AffineMap) -> None:
    """Make the bridge at ``position`` (created if absent) exactly ``fit``."""
    bridge = ensure_bridge(model, position)
    bridge.weight.copy_(fit.weight)
    bridge.bias.copy_(fit.bias)


@contextlib.contextmanager
def bridge_as(model: nn.Module, position: int, fit: AffineMap) -> Iterator[None]:
    """The bridge at ``position`` is ``fit`` inside the block, and what it was after (a bridge
    that was absent is detached again): e.g. the identity, to run a layer on a state that
    needs no bridging, without copying the model."""
    target = bridge_target(model, position)
    old = getattr(target, BRIDGE, None)
    saved = None if old is None else (old.weight.detach().clone(), old.bias.detach().clone())
    set_bridge_(model, position, fit)
    try:
        yield
    finally:
        if saved is None:
            target._linearize_hook.remove()
            del target._linearize_hook
            delattr(target, BRIDGE)
        else:
            set_bridge_(model, position, AffineMap(weight=saved[0], bias=saved[1]))


def set_span_map_(model: nn.Module, start: int, end: int, fit: AffineMap) -> None:
    """Remove layers [start, end) and make ``fit`` the whole bridge at the next kept module.

    For maps fitted end to end, from the stream entering the run (before any bridge there) to
    the original model's state after it: the bridges on either side are already accounted
    for, so they are replaced, not composed."""
    arch.remove_layers_(model, range(start, end))  # the input bridge goes with its layer
    set_bridge_(model, start, fit)


def replace_layer_(model: nn.Module, position: int, fit: AffineMap | None) -> None:
    """One layer: ``replace_span_(model, position, position + 1, fit)``."""
    replace_span_(model, position, position + 1, fit)


def proj_has_bias(proj: nn.Module) -> bool:
    return getattr(proj, "bias", None) is not None


@torch.no_grad()
def fold_into_(proj: nn.Module, fit: AffineMap) -> None:
    """Make ``proj``'s output o become o @ T + c, in its own weights (T = fit.weight,
    c = fit.bias). Handles nn.Linear (weight (d_out, d_in)) and GPT-2's Conv1D (weight
    (d_in, d_out))."""
    t, c = fit.weight, fit.bias  # (d, d), (d,)
    w = proj.weight
    has_bias = proj_has_bias(proj)
    if not has_bias and bool(c.abs().max() > 0):
        raise ValueError("a map with a bias cannot fold into a projection without one")
    if isinstance(proj, nn.Linear):
        assert w.shape[0] == t.shape[0] == t.shape[1], (w.shape, t.shape)
        proj.weight.copy_((t.T.to(torch.float64) @ w.double()).to(w.dtype))  # (d, d_ff)
    else:  # Conv1D: y = x @ weight + bias
        assert w.shape[1] == t.shape[0] == t.shape[1], (w.shape, t.shape)
        proj.weight.copy_((w.double() @ t.to(torch.float64)).to(w.dtype))  # (d_ff, d)
    if has_bias:
        b = proj.bias
        proj.bias.copy_((b.double() @ t.to(torch.float64) + c.to(torch.float64)).to(b.dtype))


def weight_rows(proj: nn.Module) -> Tensor:
    """A projection's weights as rows W (d_in, d_out) of o = x W, with the bias as one more
    row where it has one: the layout fit_toward solves for."""
    w = proj.weight.detach()
    w = w.T if isinstance(proj, nn.Linear) else w  # Conv1D already stores (d_in, d_out)
    if proj_has_bias(proj):
        w = torch.cat([w, proj.bias.detach()[None]], dim=0)
    return w.double()


@torch.no_grad()
def fit_into_(proj: nn.Module, rows: Tensor) -> None:
    """Make ``proj`` compute x ↦ x W (+ b) for ``rows`` laid out as weight_rows gives them."""
    d_in = proj.weight.shape[1] if isinstance(proj, nn.Linear) else proj.weight.shape[0]
    w, b = rows[:d_in], rows[d_in:]
    proj.weight.copy_((w.T if isinstance(proj, nn.Linear) else w).to(proj.weight.dtype))
    if proj_has_bias(proj):
        proj.bias.copy_(b[0].to(proj.bias.dtype))


def fold_span_(model: nn.Module, start: int, end: int, fit: AffineMap) -> None:
    """Fold ``fit`` (fitted by capture.fold_stats) into layer start−1's MLP output projection
    and remove layers [start, end). A bridge at ``end`` stays where it is: it acts on the
    stream leaving the run, which the fold reproduces."""
    if start < 1:
        raise LinearizeError("fold cannot replace layer 0: there is no MLP before it")
    proj = arch.mlp_out_proj(model, start - 1)
    offload.resident_(model, proj)  # else the fold is lost at the next forward
    fold_into_(proj, fit)
    arch.remove_layers_(model, range(start, end))


# -- checkpoints -------------------------------------------------------------------------
def _write_remote_code(model: nn.Module, out: Path) -> None:
    """Ship modeling_linearize.py: the bridge code plus a subclass of the stock class."""
    base = type(model)
    import transformers

    if getattr(transformers, base.__name__, None) is not base:
        return  # not a stock transformers class: nothing we could name from the file
    src = inspect.getsource(_remote_modeling)
    tail = (
        f"\n\nfrom transformers import {base.__name__}  # noqa: E402\n\n"
        f"LinearizedForCausalLM = with_bridges({base.__name__})\n"
    )
    (out / REMOTE_FILE).write_text(src + tail, encoding="utf-8")
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_linearize.LinearizedForCausalLM"}


def save(model: nn.Module, tokenizer, out: Path, record: dict[str, Any]) -> None:
    """Write a standard HF checkpoint plus bridges, with ``record`` in ``config.linearize``.

    With bridges, the checkpoint also gets modeling_linearize.py and an ``auto_map``, so that
    ``trust_remote_code=True`` loads it without linearize installed."""
    out = Path(out)
    bad = next(  # offloaded weights (meta here) were read from a checkpoint, never written
        (
            n
            for n, p in model.named_parameters()
            if p.device.type != "meta" and not torch.isfinite(p).all()
        ),
        None,
    )
    if bad is not None:
        raise LinearizeError(f"refusing to save a checkpoint with NaN/inf weights (first: {bad})")
    out.mkdir(parents=True, exist_ok=True)
    positions = bridge_positions(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = [names[id(bridge_target(model, p))] for p in positions]
    model.config.linearize = dict(record, bridges=positions, bridge_targets=targets)
    if positions:
        _write_remote_code(model, out)
    elif hasattr(model.config, "auto_map"):
        del model.config.auto_map
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    )


def check_record(record: Any, n_layers: int, where: str) -> None:
    """The pruning record of a checkpoint (``config.linearize``), checked once, on load, before
    any weight is read: what every later step trusts (the layers it kept, where its bridges
    go). A record that cannot be what linearize wrote is one line naming the field."""

    def bad(why: str) -> LinearizeError:
        return LinearizeError(f"{where}: config.json's 'linearize' record {why}")

    if not isinstance(record, dict):
        raise bad(f"is a {type(record).__name__}, not an object")
    removed = record.get("removed")
    if removed is None and "original_layers" not in record:
        return  # a record without a cut
    if not _int_list(removed):
        raise bad(f"has removed {removed!r}, not a list of layer indices")
    n = record.get("original_layers", n_layers + len(removed))  # written by every prune
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad(f"has original_layers {n!r}, not a positive integer")
    if len(set(removed)) != len(removed) or any(not 0 <= i < n for i in removed):
        raise bad(f"removes {removed}, not distinct layers among the original {n}")
    if n - len(removed) != n_layers:
        raise bad(f"keeps {n - len(removed)} of {n} layers, but the config has {n_layers} layers")
    positions, targets = record.get("bridges", []), record.get("bridge_targets", [])
    if not _int_list(positions) or not isinstance(targets, list):
        raise bad("has bridges that are not a list of positions")
    if len(targets) != len(positions) or not all(isinstance(t, str) for t in targets):
        raise bad("has bridge_targets that are not one module name per bridge")
    if any(not 0 <= p <= n_layers for p in positions):
        raise bad(f"puts bridges at {positions}, outside the {n_layers + 1} layer boundaries")


def restore_bridges_(model: nn.Module, path: Path) -> None:
    """Re-create the bridges recorded in ``config.linearize`` and load their tensors (the
    record was checked by ``check_record``; a target or tensor that does not fit this model
    is one line)."""
    record = getattr(model.config, "linearize", None) or {}
    targets = record.get("bridge_targets", [])
    if not targets:
        return
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if BRIDGE in k:
                    tensors[k] = sf.get_tensor(k)
    for target in targets:
        try:
            module = model.get_submodule(target)
        except AttributeError:
            raise LinearizeError(
                f"checkpoint {path}: its record puts a bridge at '{target}', which this model "
                "does not have"
            ) from None
        bridge = _attach(model, module)
        with torch.no_grad():
            for pname, param in bridge.named_parameters():
                key = f"{target}.{BRIDGE}.{pname}"
                if key not in tensors:
                    raise LinearizeError(f"checkpoint {path} lacks bridge tensor '{key}'")
                if tensors[key].shape != param.shape:
                    raise LinearizeError(
                        f"checkpoint {path}: bridge tensor '{key}' has shape "
                        f"{tuple(tensors[key].shape)}, not {tuple(param.shape)}"
                    )
                param.copy_(tensors[key].to(param.dtype))


def runs_of(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices → contiguous runs [start, end): [3, 4, 7] → [(3, 5), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out

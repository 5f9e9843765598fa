"""Linear replacements for removed layers, and checkpoints that carry them.

A removed run of layers becomes an affine map on the residual stream, ``h ↦ h @ W + b``. It is
not inserted into the layer list, where every architecture's forward, mask selection and KV
cache expect real decoder layers. It sits at the *input* of the next kept module: the next
decoder layer, or the final norm when the run ended the stack. There it is a submodule named
``linearize_bridge``, applied by a forward pre-hook. The model stays a stock architecture with
fewer layers, so ``save_pretrained`` writes an ordinary checkpoint plus the bridge tensors, and
``config.linearize`` records where they go. ``load`` puts them back exactly; plain
``from_pretrained`` loads the same directory without them and warns about the extra tensors.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from linearize import arch
from linearize.errors import LinearizeError
from linearize.stats import AffineMap

BRIDGE = "linearize_bridge"


class AffineBridge(nn.Module):
    """h ↦ h @ weight + bias on the residual stream; weight is (d_in, d_out)."""

    def __init__(self, d: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    def forward(self, h: Tensor) -> Tensor:
        return torch.addmm(self.bias, h.reshape(-1, h.shape[-1]), self.weight).reshape(h.shape)

    def as_affine(self) -> AffineMap:
        """A float64 copy of this map, for composing."""
        return AffineMap(weight=self.weight.detach().double(), bias=self.bias.detach().double())

    @torch.no_grad()
    def load_(self, fit: AffineMap) -> None:
        self.weight.copy_(fit.weight)
        self.bias.copy_(fit.bias)


def _bridge_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    bridge = getattr(module, BRIDGE)
    if args:
        return (bridge(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = bridge(kwargs["hidden_states"])
    return args, kwargs


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
    """The bridge at ``position``, created as the identity (with its hook) if absent."""
    target = bridge_target(model, position)
    bridge = getattr(target, BRIDGE, None)
    if bridge is None:
        p = next(model.parameters())
        bridge = AffineBridge(model.config.hidden_size, dtype=p.dtype, device=p.device)
        target.add_module(BRIDGE, bridge)
        target._linearize_hook = target.register_forward_pre_hook(
            _bridge_pre_hook, with_kwargs=True
        )
    return bridge


def bridge_positions(model: nn.Module) -> list[int]:
    _, layers = arch.get_layers(model)
    return [p for p in range(len(layers) + 1) if _has_bridge(model, p)]


def _has_bridge(model: nn.Module, position: int) -> bool:
    try:
        return get_bridge(model, position) is not None
    except LinearizeError:
        return False


def replace_layer_(model: nn.Module, position: int, fit: AffineMap | None) -> None:
    """Remove the layer at ``position`` (current numbering); ``fit`` None drops it, else the
    fitted map stands in for it. Bridges already around it are composed into one:
    input bridge → this layer's map → output bridge, placed at the next kept module."""
    before, after = get_bridge(model, position), get_bridge(model, position + 1)
    maps = [
        before.as_affine() if before is not None else None,
        fit,
        after.as_affine() if after is not None else None,
    ]
    maps = [m for m in maps if m is not None]
    arch.remove_layers_(model, [position])  # the input bridge goes with the layer
    if maps:
        ensure_bridge(model, position).load_(functools.reduce(AffineMap.then, maps))


# -- checkpoints -------------------------------------------------------------------------
def save(model: nn.Module, tokenizer, out: Path, record: dict[str, Any]) -> None:
    """Write a standard HF checkpoint plus bridges, with ``record`` in ``config.linearize``."""
    out = Path(out)
    record = dict(record, bridges=bridge_positions(model))
    model.config.linearize = record
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def restore_bridges_(model: nn.Module, path: Path) -> None:
    """Re-create the bridges recorded in ``config.linearize`` and load their tensors."""
    record = getattr(model.config, "linearize", None) or {}
    positions = record.get("bridges", [])
    if not positions:
        return
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if BRIDGE in k:
                    tensors[k] = sf.get_tensor(k)
    bridges = [ensure_bridge(model, p) for p in positions]
    names = {id(m): n for n, m in model.named_modules()}
    for bridge in bridges:
        prefix = names[id(bridge)]
        with torch.no_grad():
            for pname, param in bridge.named_parameters():
                key = f"{prefix}.{pname}"
                if key not in tensors:
                    raise LinearizeError(f"checkpoint {path} lacks bridge tensor '{key}'")
                param.copy_(tensors[key].to(param.dtype))

"""Modeling code that ships inside checkpoints written by ``linearize prune``.

A checkpoint whose removed layers were replaced by affine maps ("bridges") carries this file
as ``modeling_linearize.py``, with a last line naming the stock model class it extends, and
``config.auto_map`` pointing at it. Then
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` builds the stock model
plus its bridges, with no need for linearize itself. linearize imports the same code, so the
two ways of loading cannot drift apart. Self-contained: it imports only torch.

A bridge ``h ↦ h @ weight + bias`` sits at the *input* of a module of the stock model (the next
kept decoder layer, or the final norm), as a submodule named ``linearize_bridge`` applied by a
forward pre-hook; ``config.linearize["bridge_targets"]`` lists those modules' dotted names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BRIDGE = "linearize_bridge"


class AffineBridge(nn.Module):
    """h ↦ h @ weight + bias on the residual stream; weight is (d_in, d_out)."""

    def __init__(self, d: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    def forward(self, h: Tensor) -> Tensor:
        x = h.reshape(-1, h.shape[-1]).to(self.weight.device, self.weight.dtype)
        out = torch.addmm(self.bias, x, self.weight)  # on the bridge's device (see offload)
        return out.reshape(h.shape).to(h.dtype)


def _bridge_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    bridge = getattr(module, BRIDGE)
    if args:
        return (bridge(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = bridge(kwargs["hidden_states"])
    return args, kwargs


def attach_bridge(target: nn.Module, d: int, dtype: torch.dtype, device=None) -> AffineBridge:
    """The bridge at ``target``'s input, created as the identity (with its hook) if absent."""
    bridge = getattr(target, BRIDGE, None)
    if bridge is None:
        bridge = AffineBridge(d, dtype=dtype, device=device)
        target.add_module(BRIDGE, bridge)
        target._linearize_hook = target.register_forward_pre_hook(
            _bridge_pre_hook, with_kwargs=True
        )
    return bridge


def with_bridges(base: type) -> type:
    """A subclass of the stock model class ``base`` that builds the recorded bridges."""

    class Linearized(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            p = next(self.parameters())
            for path in config.linearize["bridge_targets"]:
                attach_bridge(self.get_submodule(path), config.hidden_size, p.dtype, p.device)

    Linearized.__name__ = Linearized.__qualname__ = f"Linearized{base.__name__}"
    return Linearized

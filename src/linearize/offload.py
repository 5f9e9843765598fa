"""Weights that accelerate keeps off the device (``device_map`` with ``max_memory`` and a disk
folder): where a module computes, and which modules a run must hold on that device.

accelerate's offload hook loads a block's weights from its weights map before each forward and
drops them after, so a write into such a weight is lost at the next forward, and an optimizer
cannot step a weight that is not there. A cut writes into a few layers (a bridge's, a fold's, a
refit's) and healing trains a few: those are brought onto their execution device for good,
and the rest stays offloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from linearize import arch

__all__ = ["execution_device", "is_offloaded", "resident_", "resident_trainable_"]


def _offload_hook(module: nn.Module):
    """The hook that offloads ``module``'s weights, if any (inside a SequentialHook too)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return next((h for h in hooks if getattr(h, "offload", False)), None)


def is_offloaded(model: nn.Module) -> bool:
    return any(_offload_hook(m) is not None for m in model.modules())


def _covering(model: nn.Module, module: nn.Module) -> list[tuple[nn.Module, object]]:
    """(block, hook) for every offloading hook that holds some of ``module``'s weights: on
    ``module`` or inside it, or on a block above it that places its submodules."""
    inside = {id(m) for m in module.modules()}
    out = []
    for block in model.modules():
        hook = _offload_hook(block)
        if hook is None:
            continue
        if id(block) in inside or (
            hook.place_submodules and any(m is module for m in block.modules())
        ):
            out.append((block, hook))
    return out


def execution_device(model: nn.Module, module: nn.Module) -> torch.device:
    """Where ``module`` computes: its weights' device, or its offload hook's device."""
    here = next((p for p in module.parameters() if p.device.type != "meta"), None)
    if here is not None:
        return here.device
    covering = _covering(model, module)
    if covering:
        return torch.device(covering[0][1].execution_device)
    return arch.input_device(model)


def resident_(model: nn.Module, module: nn.Module) -> None:
    """Load every offloaded weight of ``module`` (the whole block its hook places) onto its
    execution device and keep it there: later writes and optimizer steps then stick. A
    no-op for a model that is not offloaded."""
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    for block, hook in _covering(model, module):
        tensors = named_module_tensors(
            block,
            include_buffers=hook.offload_buffers,
            recurse=hook.place_submodules,
            remove_non_persistent=True,
        )
        for name, _ in list(tensors):
            set_module_tensor_to_device(
                block, name, hook.execution_device, value=hook.weights_map[name]
            )
        hook.offload = False  # the hook still moves inputs to its device; weights stay


def resident_trainable_(model: nn.Module) -> None:
    """Make every module that owns a trainable weight resident (``resident_``): an optimizer
    step written into an offloaded weight would be dropped with it."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own) and any(p.device.type == "meta" for p in own):
            resident_(model, module)

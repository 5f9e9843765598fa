"""Generic forward hooks, with no statistics in them: the one place the package registers a
hook (always removed in ``finally``), a layer's hidden-state input and output whatever its
calling convention, eval mode for a block, and recording states of a forward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn


class StopForward(Exception):
    """Raised after the last hooked layer: nothing downstream is needed."""


def layer_input(args: tuple, kwargs: dict) -> Tensor:
    """A decoder layer's hidden-state argument: positional in most models, a keyword in some."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(out) -> Tensor:
    """A layer's hidden states, whether it returns a tensor or a tuple led by one."""
    return out if isinstance(out, Tensor) else out[0]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block; its own mode restored after, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def hooks(
    pre: Iterable[tuple[nn.Module, Callable]] = (),
    post: Iterable[tuple[nn.Module, Callable]] = (),
    prepend: bool = False,
) -> Iterator[None]:
    """Forward pre-hooks ``pre`` and forward hooks ``post`` ((module, fn) pairs, torch's
    ``with_kwargs`` signatures) on for the block and removed in ``finally``: the one place the
    package registers a hook, so an exception never leaves one on a model."""
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend))
        for module, fn in post:
            handles.append(module.register_forward_hook(fn, with_kwargs=True, prepend=prepend))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Recorded:
    """What ``record`` kept from the latest forward pass, in module order."""

    inputs: list[Tensor | None]
    outputs: list[Tensor | None]


@contextmanager
def record(
    inputs: Sequence[nn.Module] = (), outputs: Sequence[nn.Module] = ()
) -> Iterator[Recorded]:
    """Keep the hidden-state input of each module in ``inputs`` and the output of each in
    ``outputs`` (with their autograd graph, if any) for the passes run inside the block."""
    rec = Recorded([None] * len(inputs), [None] * len(outputs))

    def keep_in(i: int) -> Callable:
        return lambda module, args, kwargs: rec.inputs.__setitem__(i, layer_input(args, kwargs))

    def keep_out(i: int) -> Callable:
        return lambda module, args, kwargs, out: rec.outputs.__setitem__(i, layer_output(out))

    with hooks(
        [(m, keep_in(i)) for i, m in enumerate(inputs)],
        [(m, keep_out(i)) for i, m in enumerate(outputs)],
    ):
        yield rec

"""The user's own list of layers (``--strategy layers --layers 3,7,9``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from linearize.errors import LinearizeError
from linearize.surgery.prune.strategies.base import Strategy, register

if TYPE_CHECKING:
    from linearize.surgery.prune.config import PruneConfig
    from linearize.surgery.prune.session import Session


@register
class Layers(Strategy):
    name = "layers"
    summary = "the layers given by --layers (original 0-based indices)"
    chosen_by = "user"
    sweepable = False  # a sweep has no list to take

    def check(self, c: PruneConfig, n: int, hf_config=None) -> int:
        if not c.layers:
            raise LinearizeError("--strategy layers needs --layers, e.g. --layers 3,7,9")
        if len(set(c.layers)) != len(c.layers):
            raise LinearizeError(f"duplicate layer indices in --layers {list(c.layers)}")
        bad = [i for i in c.layers if not 0 <= i < n]
        if bad:
            raise LinearizeError(f"--layers {bad} out of range: the model has {n} layers")
        if len(c.layers) >= n:
            raise LinearizeError(f"--layers names all {n} layers; at least one must stay")
        return len(c.layers)

    def fixed(self, c: PruneConfig) -> list[int] | None:
        return list(c.layers or [])

    def needs_calibration(self, c: PruneConfig) -> bool:
        return False  # only the replacement's fits and the refits need text

    def choose(self, s: Session) -> dict[int, float | None]:
        return {i: None for i in s.c.layers}

"""Strategies that remove one contiguous block of k layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from linearize.capture import block_distances
from linearize.errors import LinearizeError
from linearize.surgery.prune.strategies.base import Strategy, register

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


class _Block(Strategy):
    """The block of k whose input and output are closest by ``distance``."""

    distance: ClassVar[str]  # a key of capture.block_distances

    def choose(self, s: Session) -> dict[int, float | None]:
        k = s.k
        dist = block_distances(s.model, s.pass_over(s.batches, "block distances"), k)
        d = dist[self.distance]
        starts = [b for b in range(len(d)) if all(map(s.allowed, range(b, b + k)))]
        if not starts:
            raise LinearizeError(f"no run of {k} layers is free of --protect")
        best = min(starts, key=lambda b: d[b])
        return {i: d[best] for i in range(best, best + k)}


@register
class AngularBlock(_Block):
    name = "angular-block"
    reference = "Gromov et al. 2024 / PruneMe"
    summary = "the block of k with the smallest angular distance at the last token"
    chosen_by = "angular_distance_last_token"
    distance = "angular_last"


@register
class LstsqBlock(_Block):
    name = "lstsq-block"
    reference = "ReplaceMe, Shopkhoev et al. 2025"
    summary = (
        "the block of k with the smallest cosine distance over all tokens, meant for one "
        "closed-form map (--replace linear or fold)"
    )
    chosen_by = "cosine_distance"
    distance = "cosine_all"

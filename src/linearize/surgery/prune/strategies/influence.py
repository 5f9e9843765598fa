"""ShortGPT's block influence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from linearize.surgery.prune.strategies.base import Strategy, register
from linearize.surgery.prune.strategies.linear import rank_once

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


@register
class BlockInfluence(Strategy):
    name = "block-influence"
    reference = "ShortGPT, Men et al. 2024"
    summary = "the k layers with the lowest 1 − cos between input and output"
    chosen_by = "block_influence"

    def choose(self, s: Session) -> dict[int, float | None]:
        return rank_once(s)

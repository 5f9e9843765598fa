"""The deepest layers, a baseline (Gromov et al. 2024 found the last layers but the final one
the easiest to remove)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from linearize.errors import LinearizeError
from linearize.surgery.prune.strategies.base import Strategy, register

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


@register
class LastK(Strategy):
    name = "last-k"
    reference = "Gromov et al. 2024 (the deepest layers but the final one)"
    summary = (
        "the k deepest layers before the final one (the final one too only when too few "
        "others may go), without looking at any state"
    )
    chosen_by = "depth"

    def needs_calibration(self, c) -> bool:
        return False  # it looks at no state; only the replacement's fits need text

    def choose(self, s: Session) -> dict[int, float | None]:
        final = len(s.alive) - 1
        order = [p for p in range(final - 1, -1, -1) if s.allowed(p)]
        if s.allowed(final):
            order.append(final)  # the last resort
        if len(order) < s.k:
            raise LinearizeError(f"fewer than {s.k} layers are free to remove")
        return {p: float(p) for p in sorted(order[: s.k])}

"""Whole periods of a layer pattern, for models whose GGUF readers rebuild the pattern from
the depth (Gemma 3: five sliding-window layers, then one full)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from linearize import arch
from linearize.errors import LinearizeError
from linearize.surgery.prune.strategies.base import (
    Strategy,
    keep_initial,
    natural,
    parse_remove,
    ranking,
    register,
)

if TYPE_CHECKING:
    from linearize.surgery.prune.config import PruneConfig
    from linearize.surgery.prune.session import Session


@register
class PatternPeriods(Strategy):
    name = "pattern-periods"
    reference = "for exports: GGUF stores no per-layer attention pattern"
    summary = (
        "whole periods of the model's attention pattern (Gemma 3: 5 sliding + 1 full), the "
        "k/period with the best mean --score: what is left has the pattern GGUF readers "
        "rebuild for its depth, so the checkpoint exports"
    )

    sweepable = False  # only models with a layer pattern take it

    def check(self, c: PruneConfig, n: int, hf_config=None) -> int | None:
        if hf_config is None:
            return None
        period = _period(hf_config)
        k = parse_remove(c.remove, n)
        if k % period or k // period > n // period - 1:
            raise LinearizeError(
                f"--strategy {self.name} removes whole periods of {period} layers: --remove "
                f"takes a multiple of {period} below {n // period * period}"
            )
        return k

    def choose(self, s: Session) -> dict[int, float | None]:
        period = _period(s.model.config)
        stats = s.score_from(0)
        key = s.result.chosen_by
        scored = {p: ranking(st, key, s.c.ridge) for p, st in stats.items() if s.allowed(p)}
        keep_initial(s, stats, scored)
        whole = [
            range(j, j + period)
            for j in range(0, len(s.alive) - period + 1, period)
            if all(p in scored for p in range(j, j + period))
        ]
        if len(whole) * period < s.k:
            raise LinearizeError(f"fewer than {s.k // period} whole periods are free to remove")
        best = sorted(whole, key=lambda r: -sum(scored[p] for p in r) / period)[: s.k // period]
        return {p: natural(key, scored[p]) for r in sorted(best, key=lambda r: r.start) for p in r}


def _period(config) -> int:
    period = arch.pattern_period(config)
    if period is None:
        raise LinearizeError(
            f"--strategy {PatternPeriods.name} needs a periodic per-layer attention pattern "
            f"(layer_types); '{config.model_type}' has none"
        )
    return period

"""Strategies that rank layers by a statistic of their input and output states."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from linearize.capture import collect_stats
from linearize.stats import PairStats
from linearize.surgery.prune.strategies.base import (
    Strategy,
    keep_initial,
    natural,
    ranking,
    register,
    top_k,
)

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


def rank_once(s: Session) -> dict[int, float | None]:
    """Score every layer once on the original model and keep the k best: with ``--fit-target
    original`` through the stored states the fits will use, else one plain capture pass."""
    stats = (
        s.score_from(0)
        if s.c.target == "original" or s.scored_once
        else collect_stats(s.model, s.pass_over(s.batches, "scoring"), **s.scoring)
    )
    scored = {
        p: ranking(st, s.result.chosen_by, s.c.ridge) for p, st in stats.items() if s.allowed(p)
    }
    keep_initial(s, stats, scored)
    return top_k(s, scored)


@register
class LinearGreedy(Strategy):
    name = "linear-greedy"
    reference = "Razzhigaev et al. 2024 (the paper)"
    summary = (
        "k times: score every remaining layer through the current, already pruned model, "
        "remove the most linear one and fit its replacement there"
    )
    greedy = True

    def prune(self, s: Session) -> None:
        """The first pass and every fit see all ``--tokens``; the re-scoring after each cut sees
        the first ``--rescore-tokens`` of them, and starts at the cut (nothing upstream
        changed)."""
        c = s.c
        t0 = time.perf_counter()
        stats = s.score_from(0)
        s.result.first_pass_s = round(time.perf_counter() - t0, 2)
        for step in range(s.k):
            scored = {p: ranking(st, c.score, c.ridge) for p, st in stats.items() if s.allowed(p)}
            if step == 0:
                keep_initial(s, stats, scored)
            best = max(scored, key=scored.get)
            # a fit sees every calibration token, the massive ones too
            every_batch = (step == 0 or s.n_rescore == len(s.batches)) and not c.massive
            changed = s.remove_run(
                best, best + 1, natural(c.score, scored[best]), stats[best] if every_batch else None
            )
            if step + 1 < s.k:
                stats = self._rescore(s, stats, step, changed)

    @staticmethod
    def _rescore(
        s: Session, stats: dict[int, PairStats], step: int, changed: int
    ) -> dict[int, PairStats]:
        if step == 0 and s.rescored is not None:
            stats = s.rescored  # later steps compare scores over the same tokens
        restart = changed if s.c.restart else 0
        kept = {p: st for p, st in stats.items() if p < restart}
        return kept | s.score_from(restart, first=s.n_rescore)


@register
class LinearOneshot(Strategy):
    name = "linear-oneshot"
    reference = "the paper's score, ranked once"
    summary = "rank every layer once on the original model by --score, remove the k best"

    def choose(self, s: Session) -> dict[int, float | None]:
        return rank_once(s)

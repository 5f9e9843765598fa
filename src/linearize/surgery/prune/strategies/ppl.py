"""Strategies scored by calibration perplexity (``--ppl-tokens`` tokens per candidate)."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from linearize import arch
from linearize.eval.perplexity import pooled_nll
from linearize.surgery.prune.strategies.base import Strategy, keep_initial, register, top_k
from linearize.surgery.replace import bridge_as

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


@torch.no_grad()
def batches_ppl(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Perplexity over already tokenised batches (SLEB's calibration criterion)."""
    nll, count = pooled_nll(model, batches)
    return math.exp(nll / max(count, 1))


@register
class PplGreedy(Strategy):
    name = "ppl-greedy"
    reference = "SLEB, Song et al. 2024"
    summary = "k times: remove the layer whose removal raises calibration perplexity least"
    chosen_by = "calibration_perplexity"
    greedy = True
    needs_ppl_batches = True

    def prune(self, s: Session) -> None:
        for step in range(s.k):
            scored = {}
            for p in filter(s.allowed, range(len(s.alive))):
                what = f"perplexity without {s.names(p, p + 1)}"
                with arch.layers_removed(s.model, [p]):
                    scored[p] = -batches_ppl(s.model, s.pass_over(s.ppl_batches, what))
            if step == 0:
                keep_initial(s, {}, scored)
            best = max(scored, key=scored.get)
            s.remove_run(best, best + 1, -scored[best])


@register
class PplOneshot(Strategy):
    name = "ppl-oneshot"
    reference = "single-layer costs nearly multiply (benchmarks/RESULTS.md)"
    summary = (
        "replace each layer alone by its fitted map (a plain drop with --replace none), "
        "measure calibration perplexity, remove the k cheapest"
    )
    chosen_by = "calibration_perplexity"
    needs_ppl_batches = True
    every_token = True  # its candidates are fitted from the scoring statistics

    def choose(self, s: Session) -> dict[int, float | None]:
        """Each allowed layer's calibration perplexity with it alone replaced: by its affine
        map fitted on every calibration token (the same fit as ``--fit-target original`` makes
        for a first cut), or dropped with ``--replace none``; ``fold`` is scored by the map it
        approximates. Higher = remove first, as for every ranking here."""
        stats = s.score_from(0)
        scored = {}
        for p in filter(s.allowed, range(len(s.alive))):
            fit = s.fit(stats[p]) if s.replacement.fits else None
            how = "dropped" if fit is None else "mapped"
            what = f"perplexity with {s.names(p, p + 1)} {how}"
            mapped = bridge_as(s.model, p, fit) if fit is not None else contextlib.nullcontext()
            with arch.layers_removed(s.model, [p]), mapped:
                scored[p] = -batches_ppl(s.model, s.pass_over(s.ppl_batches, what))
        keep_initial(s, stats, scored)
        return top_k(s, scored)

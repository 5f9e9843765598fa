"""The search's objective: the KL of a cut model from the original, per token, over stored
calibration batches, with each candidate's replacements in place; and which batches fit the
maps, score candidates and check the result (see strategies/search.py)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from linearize import arch
from linearize.stats import AffineMap
from linearize.stats.spans import SpanMoments, TopK, kl_from_top_k
from linearize.surgery.replace import bridge_as, runs_of
from linearize.surgery.restart import run_from

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


@dataclass
class Batches:
    """Which calibration batches do what: the maps' fit, the search's scoring, the held-out
    check (disjoint from the other two whenever there are enough batches)."""

    fit: list[int]
    score: list[int]
    held: list[int]


def split_batches(n_batches: int, tokens_per_batch: int, c) -> Batches:
    """The held-out batches last, the fit's first, the scoring's after them; with too few
    batches for all three, scoring reuses the fit's and the held-out check the scoring's."""
    per = max(tokens_per_batch, 1)
    held = (
        min(max(1, math.ceil(c.search_heldout_tokens / per)), n_batches - 1) if n_batches > 1 else 0
    )
    rest = n_batches - held
    fit = max(1, min(rest, math.ceil(c.search_tokens / per)))
    score_n = max(1, math.ceil(c.search_eval_tokens / per))
    score = list(range(fit, min(rest, fit + score_n))) or list(range(min(rest, score_n)))
    return Batches(list(range(fit)), score, list(range(rest, n_batches)) or score)


@dataclass
class Objective:
    """KL of the cut model from the original on stored batches, for removed sets given as
    sorted original indices; memoised per (set, fidelity)."""

    s: Session
    moments: SpanMoments | None  # None: ``--replace none`` (runs are dropped)
    ref: dict[int, TopK]  # batch → the original's top-k
    seen: dict[tuple, float] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0

    def maps(self, removed: tuple[int, ...]) -> dict[tuple[int, int], AffineMap]:
        if self.moments is None:
            return {}
        c = self.s.c
        return {
            run: self.moments.fit(*run, ridge=c.ridge, prior=c.prior, rank=c.rank)
            for run in runs_of(list(removed))
        }

    def __call__(self, removed: tuple[int, ...], batches: list[int], rows: int | None) -> float:
        key = (removed, tuple(batches), rows)
        if key not in self.seen:
            t0 = time.perf_counter()
            total, count = 0.0, 0
            maps = self.maps(removed)
            for b in batches:
                kl, n = self._kl(removed, maps, b, rows)
                total, count = total + kl, count + n
            self.seen[key] = total / max(count, 1)
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0
        return self.seen[key]

    @torch.no_grad()
    def _kl(
        self, removed: tuple[int, ...], maps: dict, b: int, rows: int | None
    ) -> tuple[float, int]:
        s = self.s
        n = s.n_orig
        batch = {k: v[:rows] for k, v in s.batches[b].items()}
        start = removed[0]
        state = s.store.get(("o", start, b))[:rows]
        runs = runs_of(list(removed))
        tail = maps.get(runs[-1]) if runs[-1][1] == n else None  # a map after the last layer
        final: dict[str, Tensor] = {}
        with arch.layers_removed(s.model, list(removed)), contextlib.ExitStack() as stack:
            gone = 0
            for lo, hi in runs:
                if (lo, hi) in maps and hi < n:
                    stack.enter_context(bridge_as(s.model, lo - gone, maps[(lo, hi)]))
                gone += hi - lo
            stop = n - len(removed)
            if start < stop:

                def keep(_b: int, j: int, h: Tensor) -> None:
                    if j == stop:
                        final["h"] = h

                run_from(s.model, [batch], start, stop, lambda _b: state, keep)
                h = final["h"]
            else:  # every layer from the first cut on is gone
                h = state
        if tail is not None:
            h = (h.double() @ tail.weight.to(h.device) + tail.bias.to(h.device)).to(h.dtype)
        logits = arch.logits_from_final(s.model, h.to(arch.input_device(s.model)))
        ref = self.ref[b]
        sliced = TopK(ref.logp[:rows], ref.index[:rows], ref.log_rest[:rows])
        return kl_from_top_k(sliced, logits, batch["attention_mask"])

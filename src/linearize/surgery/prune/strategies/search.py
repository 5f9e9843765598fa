"""``search``: the removed set chosen by what it does to the whole model.

Every other strategy ranks layers one at a time; costs do not add up (benchmarks/RESULTS.md),
so this one searches the *set*. A candidate's fitness is the KL divergence of the original's
next-token distributions (its top 32, computed once) from the cut model's, with each removed
run's replacement in place: the affine map fitted from the original's states (``linear``, and
``fold``, which approximates that map), or nothing (``none``). An evolutionary search in the
manner of EvoPress (Sieberling et al. 2024): a parent, offspring that swap a few removed layers
for kept ones, each generation scored on growing token budgets (many offspring on few tokens,
the survivors on more), the parent replaced when a child beats it on the most.

What keeps it cheap: the original's stream at every boundary is stored by the first pass (as
for every strategy), so a candidate runs only from its first cut on; every run's map comes
from ``SpanMoments`` gathered in one pass over those states; and the seeds, every registered
strategy's own choice, start the search where the others end, so it never returns a set
worse than the best of them on its own objective. The last calibration tokens are kept out
of the search: the result and every seed are scored there too (``prune.json``'s ``search``).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from linearize import arch
from linearize.capture import masked_rows
from linearize.errors import LinearizeError
from linearize.stats.spans import SpanMoments, top_k
from linearize.surgery.prune.fitness import Batches, Objective, split_batches
from linearize.surgery.prune.strategies.base import REGISTRY, Strategy, register

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session

TOP_K = 32  # the original's tokens a distribution is kept as (the rest is one bucket)
FIDELITY = (16, 4, 1)  # a generation scores on 1/16, then 1/4, then all of the search tokens
SURVIVE = 4  # offspring scored on 1/4 of the tokens; the best of them on all
SKIP_SEEDS = {"search", "layers"}  # itself; named layers are no choice
COSTLY_SEEDS = {"ppl-greedy"}  # k × layers perplexity passes: more than the search itself


def _units(s: Session) -> list[tuple[int, ...]]:
    """What a candidate is made of: single layers, or whole periods of the model's attention
    pattern when the config has one and the cut must export (``pattern-periods``' rule)."""
    period = arch.pattern_period(s.model.config) if s.c.replace != "linear" else None
    if not period or period == 1:
        return [(p,) for p in range(s.n_orig) if s.allowed(p)]
    return [
        tuple(range(j, j + period))
        for j in range(0, s.n_orig - period + 1, period)
        if all(s.allowed(p) for p in range(j, j + period))
    ]


def _sandbox(s: Session, strategy: Strategy, own_model: bool) -> Session:
    """A copy of the session for another strategy to choose in: its own result, and a copy of
    the model when that strategy cuts as it goes (the stored original states are shared; what
    the copy stores of its own pruned stream is dropped after)."""
    sub = copy.copy(s)
    sub.strategy, sub.on_step = strategy, None
    sub.result = type(s.result)(strategy.chosen_by or s.c.score, [])
    sub.alive = list(s.alive)
    if own_model:
        sub.model = copy.deepcopy(s.model)
    return sub


def seed_names(c) -> list[str]:
    """The strategies whose choices seed the search (``--search-seeds``)."""
    if c.search_seeds in ("auto", "all"):
        skip = SKIP_SEEDS | (COSTLY_SEEDS if c.search_seeds == "auto" else set())
        return [n for n in REGISTRY.names() if n not in skip]
    names = [n.strip() for n in c.search_seeds.split(",") if n.strip()]
    for n in names:
        REGISTRY.get(n)  # an unknown name is one line
    return [n for n in names if n not in SKIP_SEEDS]


class _Clock:
    """Seconds spent in each phase of the search, for prune.json (where its time goes)."""

    def __init__(self) -> None:
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self.laps[what] = round(now - self.t, 1)
        self.t = now


def _seeds(
    s: Session, say: Callable[[str], None], clock: _Clock | None = None
) -> dict[str, tuple[int, ...]]:
    """Each seed strategy's choice (original indices); one that does not apply to this model
    or request (pattern-periods without a pattern, a block where --protect leaves none) is
    left out."""
    out: dict[str, tuple[int, ...]] = {}
    for name in seed_names(s.c):
        strategy = REGISTRY.get(name)
        try:
            strategy.check(s.c, s.n_orig, s.model.config)
        except LinearizeError:
            continue
        say(f"seed: {name}")
        sub = _sandbox(s, strategy, own_model=strategy.greedy)
        try:
            if strategy.greedy:
                strategy.prune(sub)
                chosen = list(sub.result.removed)
            else:
                chosen = list(strategy.choose(sub))
        except LinearizeError:  # e.g. no block of k layers free of --protect
            continue
        finally:
            s.store.drop_where(lambda key: key[0] == "c")  # the copy's own pruned stream
        if clock is not None:
            clock.lap(f"seed {name}")
        if len(chosen) == s.k:
            out[name] = tuple(sorted(chosen))
    return out


def _mutate(parent: frozenset, units: list[tuple[int, ...]], rng: random.Random) -> frozenset:
    """Swap one to three removed units for kept ones (EvoPress's level switch)."""
    child = set(parent)
    swaps = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
    for _ in range(min(swaps, len(child), len(units) - len(child))):
        out = rng.choice(sorted(child))
        into = rng.choice([u for u in units if u not in child])
        child.remove(out)
        child.add(into)
    return frozenset(child)


def _layers(units: frozenset) -> tuple[int, ...]:
    return tuple(sorted(p for u in units for p in u))


@register
class Search(Strategy):
    name = "search"
    reference = "EvoPress, Sieberling et al. 2024, with fitted replacements in place"
    summary = (
        "search the removed set: the cut model's KL from the original on calibration text "
        "(replacements in place), seeded with every other strategy's choice"
    )
    chosen_by = "kl_to_original"
    needs_ppl_batches = True  # the ppl-* seeds score by calibration perplexity

    def check(self, c, n: int, hf_config=None) -> int | None:
        for name in ("search_generations", "search_offspring"):
            if getattr(c, name) < 0:
                raise LinearizeError(f"--{name.replace('_', '-')} must be at least 0")
        for name in ("search_tokens", "search_eval_tokens", "search_heldout_tokens"):
            if getattr(c, name) < 1:
                raise LinearizeError(f"--{name.replace('_', '-')} must be at least 1")
        seed_names(c)
        return None

    def plan(self, c, n: int, hidden: int, weights: int, k: int):
        """The moments of every run (float64), a copy of the model for greedy seeds, and the
        passes: the seeds' (a greedy prune's re-scoring, ppl-oneshot's n perplexities) and the
        candidates' (each from its first cut on, ~2/3 of the stack, plus the LM head)."""
        pairs = sum(min(k, n - lo) for lo in range(n))
        parts = {"search: moments of every run": (n + 1 + pairs) * hidden * hidden * 8}
        names = seed_names(c)
        greedy = [m for m in names if REGISTRY.get(m).greedy]
        if greedy:
            parts["search: a model copy for greedy seeds"] = weights
        tokens = max(c.tokens, 1)
        per_gen = (
            c.search_offspring / FIDELITY[0] + SURVIVE / FIDELITY[1] + 1
        ) * c.search_eval_tokens
        passes = 0.7 * c.search_generations * per_gen / tokens
        passes += 0.7 * (len(names) + 1) * (c.search_eval_tokens + c.search_heldout_tokens) / tokens
        if "ppl-oneshot" in names:
            passes += n * c.ppl_tokens / tokens
        passes += len(greedy) * (k * min(1.0, c.rescore_tokens / tokens) * 0.5 + 0.2 * k)
        notes = [
            f"search: {c.search_generations} generations of {c.search_offspring} offspring, "
            f"seeded by {', '.join(names)}; runs of up to {k} layers fitted from one pass's "
            f"moments ({_gb(parts['search: moments of every run'])})"
        ]
        return parts, passes, notes

    def choose(self, s: Session) -> dict[int, float | None]:
        t0 = time.perf_counter()
        say = lambda what: s.on_progress(f"search: {what}", 0, 0)  # noqa: E731
        n = s.n_orig
        s.score_from(0)  # the original's stream at every boundary, stored
        clock = _Clock()
        per = int(s.batches[0]["attention_mask"].sum()) if s.batches else 1
        parts = split_batches(len(s.batches), per, s.c)
        moments = None
        if s.replacement.fits:
            moments = SpanMoments(n + 1, s.k)
            for b in _ticks(s, parts.fit, "search: moments of every run"):
                moments.update(
                    [masked_rows(s.store.get(("o", j, b)), s.masks[b]) for j in range(n + 1)]
                )
        ref = {}
        for b in sorted(set(parts.score) | set(parts.held)):
            with torch.no_grad():
                h = s.store.get(("o", n, b)).to(arch.input_device(s.model))
                ref[b] = top_k(arch.logits_from_final(s.model, h), TOP_K)
        objective = Objective(s, moments, ref)
        clock.lap("moments of every run, and the original's top-k")
        seeds = _seeds(s, say, clock)
        units = _units(s)
        best, trace = self._evolve(s, objective, seeds, units, parts)
        clock.lap("seeds scored, and the generations")
        held = {name: objective(c, parts.held, None) for name, c in seeds.items()}
        held_best = objective(best, parts.held, None)
        s.result.search = {
            "objective": "KL(original || cut) per token, top-32 + rest, replacements in place",
            "batches": {"fit": parts.fit, "score": parts.score, "held_out": parts.held},
            "seeds": {
                name: {
                    "removed": list(c),
                    "kl": objective(c, parts.score, None),
                    "kl_held_out": held[name],
                }
                for name, c in seeds.items()
            },
            "best": {
                "removed": list(best),
                "kl": objective(best, parts.score, None),
                "kl_held_out": held_best,
            },
            "trace": trace,
            "evaluations": objective.evaluations,
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "phases_s": clock.laps,
        }
        kl = objective(best, parts.score, None)
        return {p: kl for p in best}

    def _evolve(
        self,
        s: Session,
        objective: Objective,
        seeds: dict[str, tuple[int, ...]],
        units: list[tuple[int, ...]],
        parts: Batches,
    ) -> tuple[tuple[int, ...], list[dict]]:
        c = s.c
        rng = random.Random(c.seed)
        size = len(s.batches[parts.score[0]]["input_ids"])
        levels = []  # (batches, rows of each): growing budgets, the last all score batches
        for frac in FIDELITY:
            seqs = max(1, len(parts.score) * size // frac)
            levels.append((parts.score[: math.ceil(seqs / size)], seqs if seqs < size else None))
        unit_of = {p: u for u in units for p in u}
        as_units = {}
        for name, removed in seeds.items():
            if all(p in unit_of for p in removed):
                as_units[name] = frozenset(unit_of[p] for p in removed)
        if not as_units:  # no seed fits the units: start from the first k of them
            as_units["start"] = frozenset(units[: s.k // len(units[0])])
        top = lambda cand: objective(_layers(cand), *levels[-1])  # noqa: E731
        parent = min(as_units.values(), key=top)
        trace = [{"evaluations": objective.evaluations, "kl": top(parent), "s": 0.0}]
        t0 = time.perf_counter()
        total = c.search_generations
        for g in range(total):
            s.on_progress(_generation(trace[-1]), g, total)
            tried = {parent}
            kids = []
            for _ in range(c.search_offspring * 4):
                if len(kids) == c.search_offspring:
                    break
                kid = _mutate(parent, units, rng)
                if kid not in tried:
                    tried.add(kid)
                    kids.append(kid)
            for (batches, rows), keep in zip(levels[:-1], (SURVIVE, 1), strict=True):
                kids = sorted(kids, key=lambda k: objective(_layers(k), batches, rows))[:keep]
            if kids and top(kids[0]) < top(parent):
                parent = kids[0]
            trace.append(
                {
                    "evaluations": objective.evaluations,
                    "kl": top(parent),
                    "s": round(time.perf_counter() - t0, 1),
                }
            )
        s.on_progress(_generation(trace[-1]), total, total)
        return _layers(parent), trace


def _generation(last: dict) -> str:
    """The progress line of the search: generations done of all, with the best so far."""
    return (
        f"search: generations (best KL {last['kl']:.4g}, {last['evaluations']} candidates scored)"
    )


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB" if n >= 2**30 / 10 else f"{n / 2**20:.3g} MB"


def _ticks(s: Session, batches: list[int], what: str):
    s.on_progress(what, 0, len(batches))
    for i, b in enumerate(batches):
        yield b
        s.on_progress(what, i + 1, len(batches))

"""The ``Strategy`` base class and the registry that the config's validation, the CLI's help
and ``--sweep`` read. A strategy is one class: its attributes say what it needs, and ``choose``
(one-shot) or ``prune`` (greedy) does the choosing through the session's helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from linearize.errors import LinearizeError
from linearize.stats import PairStats, fit_affine, relative_error
from linearize.surgery.prune.registry import Registry
from linearize.surgery.replace import runs_of

if TYPE_CHECKING:
    from linearize.surgery.prune.config import PruneConfig
    from linearize.surgery.prune.session import Session

# criteria whose ranking value is the negated natural value (lower is better)
_NEGATED = ("replacement_error", "block_influence", "calibration_perplexity")


def parse_remove(remove: str | int, n_layers: int) -> int:
    """'8' → 8; '25%' → round(0.25·n). Refuses 0 or ≥ n (a model needs one layer)."""
    text = str(remove).strip()
    try:
        k = round(float(text[:-1]) / 100 * n_layers) if text.endswith("%") else int(text)
    except ValueError:
        raise LinearizeError(f"--remove takes a count or a percentage, got '{remove}'") from None
    if k < 1:
        raise LinearizeError(f"--remove {remove} removes no layer")
    if k >= n_layers:
        raise LinearizeError(
            f"--remove {remove} would remove all {n_layers} layers (k >= {n_layers})"
        )
    return k


def replacement_error(stats: PairStats, ridge: float = 0.0) -> float:
    """‖XW + b − Y‖²_F / ‖Y‖²_F for the fitted affine map: the share of the residual stream's
    energy the replacement would get wrong (lower is better). Unlike 1 − linearity, it is
    measured against the raw stream, mean included, which is what the next layer sees."""
    return relative_error(stats, fit_affine(stats, ridge))


def ranking(stats: PairStats, key: str, ridge: float) -> float:
    """A layer's value under criterion ``key``; higher = remove first."""
    if key == "replacement_error":
        return -replacement_error(stats, ridge)
    if key == "block_influence":
        return -(1.0 - float(stats.cos_sum / stats.n))
    return stats.scores()[key]


def natural(key: str, ranked: float) -> float:
    """The criterion's own value from its ranking value (errors and distances were negated)."""
    return -ranked if key in _NEGATED else ranked


class Strategy:
    """How the layers to remove are chosen. Subclasses set the class attributes and override
    ``choose`` (the whole set at once) or ``prune`` (their own loop of cuts)."""

    name: ClassVar[str]
    reference: ClassVar[str] = ""  # where it comes from: prune.json and the run page show it
    summary: ClassVar[str] = ""  # one line: what it does
    chosen_by: ClassVar[str | None] = None  # the criterion's name; None: the config's --score
    greedy: ClassVar[bool] = False  # one cut at a time: a sweep runs it once to the largest k
    needs_ppl_batches: ClassVar[bool] = False  # scores candidates by calibration perplexity
    every_token: ClassVar[bool] = False  # fits from its scoring statistics: keep massive tokens
    sweepable: ClassVar[bool] = True  # compared over counts by ``--sweep`` (and in its "all")

    def check(self, c: PruneConfig, n: int, hf_config=None) -> int | None:
        """Validate what only this strategy reads (against the model's config when given);
        returns k when it fixes it (else None: ``--remove`` decides)."""
        return None

    def fixed(self, c: PruneConfig) -> list[int] | None:
        """The layers it removes whatever the model says (original indices), if known now."""
        return None

    def plan(
        self, c: PruneConfig, n: int, hidden: int, weights: int, k: int
    ) -> tuple[dict[str, int], float, list[str]]:
        """What choosing costs beyond the engine's own plan (``--dry-run``): RAM parts in bytes,
        passes over the calibration text, notes. The strategy knows; the plan asks."""
        return {}, 0.0, []

    def needs_calibration(self, c: PruneConfig) -> bool:
        """Whether choosing needs calibration text at all."""
        return True

    def choose(self, s: Session) -> dict[int, float | None]:
        """Original indices → the value that chose them."""
        raise NotImplementedError

    def prune(self, s: Session) -> None:
        """Remove the chosen set, one fit per contiguous run, in ascending order, so every fit
        sees the model as upstream cuts left it."""
        chosen = self.choose(s)
        for lo, hi in runs_of(list(chosen)):
            p = s.alive.index(lo)
            s.remove_run(p, p + (hi - lo), chosen[lo])


REGISTRY: Registry[Strategy] = Registry("strategy")
register, names, get = REGISTRY.register, REGISTRY.names, REGISTRY.get


def keep_initial(s: Session, stats: dict[int, PairStats], scored: dict[int, float]) -> None:
    """Record the criterion of every layer before the first cut (positions are original
    indices then) for the run's page; layers a strategy may not remove get their scores but
    no criterion."""
    key = s.result.chosen_by
    s.result.initial = [
        {
            "layer": p,
            "criterion": natural(key, scored[p]) if p in scored else None,
            **({k: float(v) for k, v in stats[p].scores().items()} if p in stats else {}),
        }
        for p in sorted(set(stats) | set(scored))
    ]


def top_k(s: Session, scored: dict[int, float]) -> dict[int, float | None]:
    """The k highest-ranked positions (original indices before any cut), natural values."""
    top = sorted(scored, key=scored.get, reverse=True)[: s.k]
    return {p: natural(s.result.chosen_by, scored[p]) for p in top}

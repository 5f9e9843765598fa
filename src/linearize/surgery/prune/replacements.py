"""What stands in for a run of removed layers (``--replace``), one class each, in a registry.

- ``none`` drops the layers;
- ``linear`` puts one affine map (least squares on raw states, float64 normal equations,
  optional ridge) where the run was, fitted to the run's own output (``local``) or to the
  original model's state where the run ends (``original``, the default);
- ``fold`` multiplies that map into the MLP output projection of the layer before the run,
  leaving a stock checkpoint.

The session calls ``apply`` for each run and ``finish`` once after the last; the config reads
the class attributes (defaults, what must be checked). A new replacement is one class here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from linearize import arch
from linearize.capture import masked_rows, span_stats
from linearize.stats import PairStats, relative_error
from linearize.surgery.prune.registry import Registry
from linearize.surgery.replace import (
    bridge_positions,
    fold_span_,
    proj_has_bias,
    replace_span_,
    set_bridge_,
    set_span_map_,
)

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


class Replacement:
    """One kind of stand-in. ``apply`` returns (the fit's relative error or None, the first
    position whose input changed)."""

    name: ClassVar[str]
    default_refits: ClassVar[int] = 2  # kept layers refit after each cut, unless told
    default_target: ClassVar[str] = "original"  # what ``--fit-target auto`` means
    needs_mlp_before: ClassVar[bool] = False  # the layer before a run must have an MLP
    fits: ClassVar[bool] = True  # fits something to calibration states

    def apply(
        self, s: Session, start: int, end: int, stats: PairStats | None
    ) -> tuple[float | None, int]:
        raise NotImplementedError

    def finish(self, s: Session) -> None:
        """After every cut and before the reconstruction."""


REGISTRY: Registry[Replacement] = Registry("replacement")
register, names, get = REGISTRY.register, REGISTRY.names, REGISTRY.get


@register
class Drop(Replacement):
    name = "none"
    default_refits = 0  # plain dropping stays the baseline it is named for
    fits = False

    def apply(self, s, start, end, stats):
        replace_span_(s.model, start, end, None)
        return None, start


def original_linear_stats(s: Session, start: int, end: int) -> PairStats:
    """X: the pruned model's raw stream entering position ``start``; Y: the original's
    stream at the boundary the run [start, end) ends on."""
    s.ensure_valid(start)
    xk, yk = s.key(start), ("o", s.target_of(end))
    return s.stored_pairs(lambda b: s.store.get(xk + (b,)), lambda b: s.store.get(yk + (b,)))


@register
class Linear(Replacement):
    name = "linear"

    def apply(self, s, start, end, stats):
        if s.c.target == "original":
            fs = original_linear_stats(s, start, end)
            fit = s.fit(fs)
            set_span_map_(s.model, start, end, fit)
            return relative_error(fs, fit), start
        if stats is None:
            what = f"fitting the map for {s.names(start, end)}"
            stats = span_stats(s.model, s.pass_over(s.batches, what), start, end)
        fit = s.fit(stats)
        replace_span_(s.model, start, end, fit)
        return relative_error(stats, fit), start

    def finish(self, s):
        """``--refit``: refit every bridge once more, in order, from the pruned model's final
        upstream stream to the original's state: maps fitted early saw inputs that later
        upstream cuts changed."""
        if not (s.c.refit and s.c.target == "original"):
            return
        for p in bridge_positions(s.model):
            set_bridge_(s.model, p, s.fit(original_linear_stats(s, p, p)))
            s.changed(p)


def fold_stats(s: Session, start: int, end: int, original: bool) -> PairStats:
    """Pairs for folding the run [start, end) into layer start−1's MLP output m: x = m,
    y = Y − h + m, with h that layer's output in the pruned model and Y the stream the fold
    must produce: the run's own output (local, capture.fold_stats's pairs) or the original's
    state where the run ends."""
    yk, stats = ("o", s.target_of(end)), PairStats()

    def use(b: int, g: Tensor, m: Tensor, h: Tensor, h_stop: Tensor, _x) -> None:
        target = s.store.get(yk + (b,)).to(h) if original else h_stop
        x, y = masked_rows(m, s.masks[b]), masked_rows(target - h + m, s.masks[b])
        if s.c.fit_weight == "norm":  # an error relative to the stream the next norm reads
            norms = masked_rows(target, s.masks[b]).float().norm(dim=-1, keepdim=True)
            w = (norms.median() / norms.clamp(min=1e-6)).to(x.dtype)
            x, y = x * w, y * w
        stats.update(x, y)

    what = f"folding {s.names(start, end)} into"
    s.projection_pass(start - 1, start if original else end, use, what=what)
    return stats


@register
class Fold(Replacement):
    name = "fold"
    default_target = "local"  # one MLP projection fitted to the original's state lost
    needs_mlp_before = True

    def apply(self, s, start, end, stats):
        fs = fold_stats(s, start, end, s.c.target == "original")
        proj = arch.mlp_out_proj(s.model, start - 1)
        fit = s.fit(fs, bias=proj_has_bias(proj))
        fold_span_(s.model, start, end, fit)
        return relative_error(fs, fit), start - 1

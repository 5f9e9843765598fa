"""Moments of a stack's boundary states, for the map of any run of layers; and the divergence of
next-token distributions through the reference's top-k.

Pure tensor math, no model knowledge. A stack of n layers has boundaries 0..n (boundary j is
the stream entering layer j; n the stream after the last one). Removing the run [lo, hi) and
standing an affine map in for it needs the moments of the pairs (x_lo, x_hi). A search over
removed *sets* asks for many runs, so ``SpanMoments`` gathers, in one pass over the states,
Σx_j and Σx_jx_jᵀ at every boundary and Σx_lo x_hiᵀ for every pair up to ``max_span`` apart:
memory (n + 1 + n·max_span)·d² float64 numbers, whatever the token count, and the map of any
run of at most ``max_span`` layers is a solve away (``fit_affine``, with its ridge, prior and
rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from linearize.stats.fits import AffineMap, fit_affine

_F64 = torch.float64


@dataclass
class _Span:
    """The moments of one run, in the shape ``fit_affine`` reads (``centered``)."""

    n: int
    cxx: Tensor
    cxy: Tensor
    mx: Tensor
    my: Tensor

    def centered(self) -> tuple[Tensor, Tensor, None, Tensor, Tensor]:
        return self.cxx, self.cxy, None, self.mx, self.my


class SpanMoments:
    """Moments of the boundary states of a stack, accumulated one batch at a time.

    Shifted by the first batch's means (as ``PairStats``), in float64: the shifts keep the
    large mean of a residual stream from cancelling digits away, and float64 products keep the
    fits of long runs, whose input moments are the worst conditioned, what least squares on
    the rows gives (float32 products lost 0.2 on a weight of a 3-layer run in the tests).
    """

    def __init__(self, n_boundaries: int, max_span: int) -> None:
        if n_boundaries < 2 or max_span < 1:
            raise ValueError("need at least two boundaries and a span of at least 1")
        self.nb, self.max_span = n_boundaries, max_span
        self.n = 0
        self.shift: list[Tensor] = []  # (d,) per boundary
        self.s1: list[Tensor] = []  # Σ(x − shift), (d,)
        self.g: list[Tensor] = []  # Σ(x − shift)(x − shift)ᵀ, (d, d)
        self.p: dict[tuple[int, int], Tensor] = {}  # (lo, hi) → Σ(x_lo − s)(x_hi − s)ᵀ

    def pairs(self) -> list[tuple[int, int]]:
        """The (lo, hi) runs whose maps can be fitted: 1 ≤ hi − lo ≤ max_span."""
        return [
            (lo, hi)
            for lo in range(self.nb - 1)
            for hi in range(lo + 1, min(lo + self.max_span, self.nb - 1) + 1)
        ]

    def update(self, rows: Sequence[Tensor]) -> None:
        """``rows[j]``: the (N, d) states at boundary j of the same N tokens."""
        if len(rows) != self.nb:
            raise ValueError(f"expected {self.nb} boundaries, got {len(rows)}")
        if not self.shift:
            self.shift = [r.to(_F64).mean(0) for r in rows]
            d = rows[0].shape[1]
            z = lambda *s: torch.zeros(*s, dtype=_F64, device=rows[0].device)  # noqa: E731
            self.s1 = [z(d) for _ in rows]
            self.g = [z(d, d) for _ in rows]
            self.p = {key: z(d, d) for key in self.pairs()}
        xs = [r.to(_F64) - s for r, s in zip(rows, self.shift, strict=True)]
        for j, x in enumerate(xs):
            self.s1[j] += x.sum(0)
            self.g[j] += x.T @ x
        for lo in range(self.nb - 1):
            his = list(range(lo + 1, min(lo + self.max_span, self.nb - 1) + 1))
            prods = xs[lo].T @ torch.cat([xs[h] for h in his], dim=1)  # (d, m·d)
            for i, hi in enumerate(his):
                self.p[(lo, hi)] += prods[:, i * xs[lo].shape[1] : (i + 1) * xs[lo].shape[1]]
        self.n += rows[0].shape[0]

    def span(self, lo: int, hi: int) -> _Span:
        """The centred moments (sums, not /N) of the pairs (x_lo, x_hi)."""
        if (lo, hi) not in self.p:
            raise ValueError(f"run [{lo}, {hi}) is not within {self.max_span} layers")
        if self.n == 0:
            raise ValueError("no tokens were accumulated")
        mx, my = self.s1[lo] / self.n, self.s1[hi] / self.n
        cxx = self.g[lo] - self.n * torch.outer(mx, mx)
        cxy = self.p[(lo, hi)] - self.n * torch.outer(mx, my)
        return _Span(self.n, cxx, cxy, self.shift[lo] + mx, self.shift[hi] + my)

    def fit(
        self, lo: int, hi: int, ridge: float = 0.0, prior: str = "zero", rank: int | None = None
    ) -> AffineMap:
        """The least-squares affine map from boundary ``lo`` to boundary ``hi``."""
        return fit_affine(self.span(lo, hi), ridge, prior=prior, rank=rank)  # type: ignore[arg-type]


@dataclass
class TopK:
    """A reference's next-token distributions, kept as their top k: log-probabilities (…, k),
    token ids (…, k) and the log of the mass outside them (…)."""

    logp: Tensor
    index: Tensor
    log_rest: Tensor


def top_k(logits: Tensor, k: int) -> TopK:
    """The top ``k`` of ``logits`` (…, V) as log-probabilities, and the rest's log-mass."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(vals, idx, _log_rest(vals))


def _log_rest(logp_top: Tensor) -> Tensor:
    """log(1 − Σ p) over the kept tokens, floored so that an empty rest stays finite."""
    return (1.0 - logp_top.exp().sum(-1)).clamp(min=1e-20).log()


def kl_from_top_k(ref: TopK, logits: Tensor, mask: Tensor | None = None) -> tuple[float, int]:
    """Σ over tokens of KL(reference ‖ model) on the reference's top k plus one bucket for the
    rest of the vocabulary (a lower bound of the full KL, exact as k → V), and the token count.
    ``mask`` (…) marks the tokens that count."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(-1, ref.index.to(logq.device))
    p_top = ref.logp.to(logq.device)
    q_rest = _log_rest(q_top)
    p_rest = ref.log_rest.to(logq.device)
    kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    if mask is not None:
        m = mask.to(kl.device).bool()
        return float(kl[m].sum()), int(m.sum())
    return float(kl.sum()), kl.numel()

"""Least-squares fits from accumulated moments: the affine map that stands in for removed
layers (``fit_affine``), a refit pulled toward a layer's own weights (``fit_toward``), and the
share of the target a map gets wrong (``relative_error``). Pure tensor math, as the moments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from linearize.stats.moments import _F64, PairStats, SymmetricPinv, gram


@dataclass(frozen=True)
class AffineMap:
    """y ≈ x @ weight + bias, fitted on raw (uncentred) states. weight is (d_in, d_out)."""

    weight: Tensor
    bias: Tensor

    def then(self, other: AffineMap) -> AffineMap:
        """This map followed by ``other``: (x W1 + b1) W2 + b2 = x (W1 W2) + (b1 W2 + b2)."""
        w2, b2 = other.weight.to(self.weight), other.bias.to(self.weight)
        return AffineMap(weight=self.weight @ w2, bias=self.bias @ w2 + b2)


PRIORS = ("zero", "identity")


def fit_affine(
    stats: PairStats,
    ridge: float = 0.0,
    bias: bool = True,
    prior: str = "zero",
    rank: int | None = None,
) -> AffineMap:
    """Least-squares affine map from X to Y using the accumulated moments.

    Solving on centred moments and recovering the bias from the means is the same problem as
    regressing on [X, 1], but better conditioned. ``ridge`` is relative: λ = ridge · tr(C)/d,
    so one value means the same thing for layers of very different scale; ``ridge=inf`` is the
    prior itself. ``prior`` is what the ridge pulls W towards: ``zero`` (classic ridge) or
    ``identity``, the natural prior for a residual stream that passes a removed layer almost
    unchanged: it penalises ‖W − I‖², i.e. fits the update B = W − I with a ridge. ``rank``
    keeps only the best rank-r update W − I (reduced-rank regression: the fitted update
    projected on the top-r principal directions of its own output), fewer parameters per map.
    With ``bias`` False the map is linear (y ≈ x W, fitted on raw moments), for targets that
    cannot take a bias, such as a bias-free projection the map is folded into.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior '{prior}' (choose from {', '.join(PRIORS)})")
    if bias:
        cxx, cxy, _, mx, my = stats.centered()
    else:
        cxx, cxy = stats.xx, stats.xy
    d = cxx.shape[0]
    eye = torch.eye(d, dtype=_F64, device=cxx.device)
    identity = prior == "identity" or rank is not None
    if math.isinf(ridge):
        weight = eye.clone() if prior == "identity" else torch.zeros_like(cxy)
    else:
        rhs = cxy - cxx if identity else cxy  # identity: fit the update B = W − I
        if ridge > 0.0:
            lam = ridge * float(torch.trace(cxx)) / d
            if identity and prior == "zero":  # ridge on W itself while fitting B: pull B to −I
                rhs = rhs - lam * eye
            cxx = cxx + lam * eye
        update = SymmetricPinv(cxx).solve(rhs)  # (d_in, d_out)
        if rank is not None and rank < d:
            fitted = update.T @ cxx @ update  # covariance of X·B, the fitted update
            _, vecs = torch.linalg.eigh(fitted)
            top = vecs[:, -rank:] if rank > 0 else vecs[:, :0]
            update = update @ top @ top.T
        weight = eye + update if identity else update
    if not bias:
        return AffineMap(weight=weight, bias=torch.zeros_like(weight[0]))
    return AffineMap(weight=weight, bias=my - mx @ weight)  # bias: (d_out,)


class RegressionStats:
    """XᵀX and XᵀY of rows x (N, d_in) → y (N, d_out), in float64: for least-squares refits
    of a weight matrix whose input and output differ in size (an MLP's output projection).
    With ``bias`` a column of ones is appended to x, so the last row of a fit is the bias."""

    def __init__(self, bias: bool = False) -> None:
        self.bias = bias
        self.xx: Tensor | None = None
        self.xy: Tensor | None = None

    def update(self, x: Tensor, y: Tensor) -> None:
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected (N, d_in) and (N, d_out) rows, got {x.shape}, {y.shape}")
        x, y = x.to(_F64), y.to(_F64)
        if self.bias:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        if self.xx is None:
            self.xx = x.new_zeros(x.shape[1], x.shape[1])
            self.xy = x.new_zeros(x.shape[1], y.shape[1])
        self.xx += gram(x)
        self.xy += x.T @ y


def fit_toward(stats: RegressionStats, prior: Tensor, ridge: float) -> Tensor:
    """argmin_W ‖XW − Y‖² + λ‖W − W₀‖² with W₀ = ``prior`` (d_in(+1), d_out): a refit that
    stays near the weights it starts from. λ = ridge · tr(XᵀX)/d_in, as in fit_affine; the
    bias row (``stats.bias``) is not pulled."""
    if stats.xx is None:
        raise ValueError("no rows were accumulated")
    xx, w0 = stats.xx, prior.to(_F64)
    if math.isinf(ridge):
        return w0.clone()
    d = xx.shape[0] - int(stats.bias)
    pull = torch.ones(xx.shape[0], dtype=_F64, device=xx.device)
    if stats.bias:
        pull[-1] = 0.0
    lam = ridge * float(torch.trace(xx[:d, :d])) / d
    return SymmetricPinv(xx + lam * torch.diag(pull)).solve(stats.xy + lam * pull[:, None] * w0)


def relative_error(stats: PairStats, fit: AffineMap) -> float:
    """‖XW + b − Y‖²_F / ‖Y‖²_F of a map on the accumulated pairs, from the raw moments alone:
    the share of Y's energy (mean included) that the map gets wrong."""
    w, b = fit.weight.to(stats.xx), fit.bias.to(stats.xx)
    err = (
        torch.trace(w.T @ stats.xx @ w)
        - 2 * torch.trace(w.T @ stats.xy)
        + torch.trace(stats.yy)
        + stats.n * b @ b
        + 2 * b @ (w.T @ stats.sx)
        - 2 * b @ stats.sy
    )
    return float(err / torch.trace(stats.yy))

"""Streaming float64 statistics of paired hidden states, and the scores computed from them.

Pure tensor math: nothing here knows what a model is. A layer maps rows x_t (its input, one
per token) to rows y_t (its output). Every score the tool reports is a function of a few
moments of the stacked pairs, so we accumulate those moments batch by batch and never hold
the stacked matrices: memory is O(d²) whatever the number of tokens N.

The paper's linearity score (Razzhigaev et al., 2024) is

    X̃ = (X − mean X) / ‖X − mean X‖_F,   Ỹ likewise,   A = argmin ‖X̃A − Ỹ‖_F,
    linearity = 1 − ‖X̃A − Ỹ‖²_F.

With C_xx = X̃ᵀX̃-style centred moments, the least-squares residual has the closed form
‖Ỹ‖² − tr(C_xyᵀ C_xx⁺ C_xy)/tr(C_yy), and ‖Ỹ‖ = 1, so

    linearity = tr(C_xyᵀ C_xx⁺ C_xy) / tr(C_yy)

(the R² of the centred regression). C_xx⁺ is a pseudo-inverse taken through an
eigendecomposition, so rank-deficient statistics (fewer tokens than d, dead dimensions) give
the least-squares answer rather than a blown-up inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64


class PairStats:
    """Float64 moments of paired rows (x_t, y_t), accumulated one batch at a time.

    Holds n, Σx, Σy, XᵀX, XᵀY, YᵀY and per-row sums of cos(x_t, y_t) and of its angle.
    ``x_source`` lets a layer borrow its input moments from the previous layer's output
    moments when the two are the same tensor (a plain decoder stack): that skips one d×d
    product per token and one d×d buffer per layer, a third of the work and memory.
    """

    def __init__(self, x_source: PairStats | None = None) -> None:
        self.x_source = x_source
        self.n = 0
        self._sx: Tensor | None = None  # (d,)
        self._xx: Tensor | None = None  # (d, d)
        self.sy: Tensor | None = None  # (d,)
        self.xy: Tensor | None = None  # (d, d)
        self.yy: Tensor | None = None  # (d, d)
        self.cos_sum: Tensor | None = None  # ()
        self.angle_sum: Tensor | None = None  # (), Σ arccos(cos)/π

    # -- accumulation -------------------------------------------------------------------
    def _alloc(self, d: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=_F64, device=device)  # noqa: E731
        if self.x_source is None:
            self._sx, self._xx = z(d), z(d, d)
        self.sy, self.xy, self.yy = z(d), z(d, d), z(d, d)
        self.cos_sum, self.angle_sum = z(()), z(())

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows x (N, d) and y (N, d); any float dtype, converted to float64 here."""
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f"expected two (N, d) tensors of one shape, got {x.shape}, {y.shape}")
        if x.shape[0] == 0:
            return
        x, y = x.to(_F64), y.to(_F64)  # no copy when already float64
        if self.yy is None:
            self._alloc(x.shape[1], x.device)
        if self.x_source is None:
            self._sx += x.sum(0)
            self._xx.addmm_(x.T, x)  # (d, d)
        self.sy += y.sum(0)
        self.xy.addmm_(x.T, y)  # (d, d)
        self.yy.addmm_(y.T, y)  # (d, d)
        cos = row_cosine(x, y)  # (N,)
        self.cos_sum += cos.sum()
        self.angle_sum += torch.arccos(cos.clamp(-1.0, 1.0)).sum() / math.pi
        self.n += x.shape[0]

    @property
    def sx(self) -> Tensor:
        return self.x_source.sy if self.x_source is not None else self._sx

    @property
    def xx(self) -> Tensor:
        return self.x_source.yy if self.x_source is not None else self._xx

    def owned_tensors(self) -> list[Tensor]:
        """The buffers this object owns (borrowed ones excluded), e.g. for an all-reduce."""
        own = [self.sy, self.xy, self.yy, self.cos_sum, self.angle_sum]
        if self.x_source is None:
            own += [self._sx, self._xx]
        return own

    # -- scores ---------------------------------------------------------------------------
    def centered(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return (C_xx, C_xy, C_yy, mean_x, mean_y): centred second moments (sums, not /N)."""
        if self.n == 0 or self.yy is None:
            raise ValueError("no tokens were accumulated")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * torch.outer(mx, mx)
        cxy = self.xy - self.n * torch.outer(mx, my)
        cyy = self.yy - self.n * torch.outer(my, my)
        return cxx, cxy, cyy, mx, my

    def scores(self, anisotropy: bool = False) -> dict[str, float]:
        """All per-layer scores, as plain floats."""
        cxx, cxy, cyy, _, _ = self.centered()
        pinv = SymmetricPinv(cxx)
        # Without residual: Y' = Y − X, so C_xy' = C_xy − C_xx and C_y'y' = C_yy − C_xy − C_yx + C_xx.
        cxr = cxy - cxx
        crr = cyy - cxy - cxy.T + cxx
        cos = float(self.cos_sum / self.n)
        out = {
            "linearity": pinv.explained_fraction(cxy, cyy),
            "linearity_no_residual": pinv.explained_fraction(cxr, crr),
            "cosine": cos,
            "block_influence": 1.0 - cos,
            "angular_distance": float(self.angle_sum / self.n),
        }
        if anisotropy:
            out["anisotropy"] = anisotropy_from_cov(cyy)
        return out


def first_nonfinite(stats: dict[int, PairStats]) -> tuple[int, str] | None:
    """(layer, "input" | "output") of the first pair whose moments hold NaN or inf: one
    overflowing token makes its layer's sums non-finite, so this costs nothing per batch."""
    for i in sorted(stats):
        s = stats[i]
        if s.yy is None:
            continue
        if not (torch.isfinite(s.sx).all() and torch.isfinite(s.xx).all()):
            return i, "input"
        if not (torch.isfinite(s.sy).all() and torch.isfinite(s.yy).all()
                and torch.isfinite(s.xy).all()):  # fmt: skip
            return i, "output"
    return None


def row_cosine(x: Tensor, y: Tensor, eps: float = 1e-30) -> Tensor:
    """cos(x_t, y_t) for each row t; a zero row gets cosine 0."""
    dots = (x * y).sum(-1)
    return dots / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)


class SymmetricPinv:
    """Pseudo-inverse of a symmetric PSD matrix through its eigendecomposition.

    Eigenvalues below ``rtol · λ_max`` count as zero, as ``torch.linalg.pinv`` does with
    singular values; the default rtol = d·eps(float64) is the noise floor of a float64 Gram.
    """

    def __init__(self, c: Tensor, rtol: float | None = None) -> None:
        evals, evecs = torch.linalg.eigh(c.to(_F64))
        d = c.shape[0]
        rtol = d * torch.finfo(_F64).eps if rtol is None else rtol
        top = evals.max().clamp_min(0.0)
        keep = evals > rtol * top
        self.evals = evals[keep]  # (k,)
        self.evecs = evecs[:, keep]  # (d, k)
        self.rank = int(keep.sum())

    def solve(self, b: Tensor) -> Tensor:
        """C⁺ b for b (d, m): the minimum-norm least-squares solution."""
        return self.evecs @ ((self.evecs.T @ b) / self.evals[:, None])

    def explained_fraction(self, cxy: Tensor, cyy: Tensor) -> float:
        """tr(C_xyᵀ C_xx⁺ C_xy) / tr(C_yy): the R² of regressing centred Y on centred X."""
        total = float(torch.trace(cyy))
        if not total > 0.0:
            return float("nan")  # Y is constant: the normalised score is undefined
        proj = self.evecs.T @ cxy  # (k, d_y)
        explained = float((proj.square().sum(1) / self.evals).sum())
        return explained / total


def anisotropy_from_cov(cyy: Tensor) -> float:
    """Largest share of variance along one direction: λ_max(C) / tr(C) (llm-microscope's)."""
    total = float(torch.trace(cyy))
    if not total > 0.0:
        return float("nan")
    return float(torch.linalg.eigvalsh(cyy).max()) / total


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


def relative_error(stats: PairStats, fit: AffineMap) -> float:
    """‖XW + b − Y‖²_F / ‖Y‖²_F of a map on the accumulated pairs, from the raw moments alone:
    the share of Y's energy (mean included) that the map gets wrong."""
    w, b = fit.weight.to(stats.xx), fit.bias.to(stats.xx)
    err = (torch.trace(w.T @ stats.xx @ w) - 2 * torch.trace(w.T @ stats.xy)
           + torch.trace(stats.yy) + stats.n * b @ b
           + 2 * b @ (w.T @ stats.sx) - 2 * b @ stats.sy)  # fmt: skip
    return float(err / torch.trace(stats.yy))


def procrustes_linearity(x: Tensor, y: Tensor) -> float:
    """The paper's computation on stacked states, kept as the reference our streaming path must
    match: centre, divide by the Frobenius norm, A = pinv(X̃)Ỹ, score = 1 − ‖X̃A − Ỹ‖²."""
    x, y = x.to(_F64), y.to(_F64)
    xc, yc = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    xn, yn = xc / xc.norm(), yc / yc.norm()
    a = torch.linalg.pinv(xn) @ yn
    return float(1.0 - (xn @ a - yn).square().sum())

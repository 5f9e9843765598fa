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

import torch
from torch import Tensor

_F64 = torch.float64


class PairStats:
    """Moments of paired rows (x_t, y_t), accumulated one batch at a time, in float64.

    Kept as moments of X and of the update D = Y − X about fixed shifts (the first batch's
    means): n, Σx', Σx'x'ᵀ, Σd', Σx'd'ᵀ, Σd'd'ᵀ with x' = x − a and d' = (y − b) − x', plus
    per-row sums of cos(x_t, y_t) and of its angle. Why: a residual layer's update is small
    next to its stream (cos ≈ 0.97) and a few massive dimensions carry large means, so moments
    of Y, or raw moments centred afterwards, lose digits to cancellation; shifted moments of X
    and D do not. That is what lets ``fast`` take each batch's d×d products in float32 (about
    twice the speed on CPU) and still agree with float64 products to ~1e-7.
    ``x_source`` lets a layer borrow its X moments from the previous layer's Y moments when
    the two are the same tensor (a plain decoder stack): one d×d product per token less.
    """

    def __init__(self, x_source: PairStats | None = None, fast: bool = False) -> None:
        self.x_source = x_source
        self.fast = fast
        self.n = 0
        self._a: Tensor | None = None  # (d,) shift of x (borrowers use the source's b)
        self.b: Tensor | None = None  # (d,) shift of y
        self._s1: Tensor | None = None  # (d,) Σx'
        self._g: Tensor | None = None  # (d, d) Σx'x'ᵀ
        self.sd: Tensor | None = None  # (d,) Σd'
        self.p: Tensor | None = None  # (d, d) Σx'd'ᵀ
        self.q: Tensor | None = None  # (d, d) Σd'd'ᵀ
        self.cos_sum: Tensor | None = None  # ()
        self.angle_sum: Tensor | None = None  # (), Σ angle/π
        self._cache: tuple | None = None
        self._carry: tuple | None = None  # (y rows, y − b, ‖y‖) of the last update

    def end_batch(self) -> None:
        """Forget the rows kept for a borrower's next update: they do not outlive a batch."""
        self._carry = None

    # -- accumulation -------------------------------------------------------------------
    def _alloc(
        self, d: int, device: torch.device, x: Tensor | None = None, y: Tensor | None = None
    ) -> None:
        z = lambda *s: torch.zeros(*s, dtype=_F64, device=device)  # noqa: E731
        # shifts are rounded to the working precision, so x − a is what the books say it is
        shift = lambda v: v.mean(0, dtype=_F64).to(self._work(v)).to(_F64)  # noqa: E731
        if self.x_source is None:
            self._a = z(d) if x is None else shift(x)
            self._s1, self._g = z(d), z(d, d)
        self.b = z(d) if y is None else shift(y)
        self.sd, self.p, self.q = z(d), z(d, d), z(d, d)
        self.cos_sum, self.angle_sum = z(()), z(())

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows x (N, d) and y (N, d) of any float dtype."""
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f"expected two (N, d) tensors of one shape, got {x.shape}, {y.shape}")
        if x.shape[0] == 0:
            return
        if self.q is None:
            self._alloc(x.shape[1], x.device, x, y)
        work = self._work(x)
        src = self.x_source
        carry = src._carry if src is not None else None
        x_in, y_in = x, y
        x, y = x.to(work), y.to(work)
        if carry is not None and carry[0] is x_in:
            xs, nx = carry[1], carry[2]  # the previous layer's y − b and ‖y‖: this layer's x
        else:
            xs, nx = x - self.a.to(work), x.norm(dim=-1)
        if src is not None:
            src._carry = None
        ys = y - self.b.to(work)
        ds = ys - xs
        ny = y.norm(dim=-1)
        cos, angle = cosine_angle_from_norms(nx, ny, (y - x).norm(dim=-1))
        if self.x_source is None:
            self._s1 += xs.sum(0).to(_F64)
            self._g += gram(xs)
        self.sd += ds.sum(0).to(_F64)
        self.p += (xs.T @ ds).to(_F64)
        self.q += gram(ds)
        self.cos_sum += cos.sum(dtype=_F64)
        self.angle_sum += angle.sum(dtype=_F64) / math.pi
        self._carry = (y_in, ys, ny)  # for a borrower's next update; dropped there
        self.n += x.shape[0]

    def _work(self, v: Tensor) -> torch.dtype:
        """The products' dtype: float32 with ``fast`` (float16/bfloat16 rows are upcast)."""
        return torch.float32 if self.fast and v.dtype != _F64 else _F64

    # -- moments ----------------------------------------------------------------------------
    @property
    def a(self) -> Tensor:
        return self.x_source.b if self.x_source is not None else self._a

    def _x_moments(self) -> tuple[Tensor, Tensor]:
        """(Σx', Σx'x'ᵀ) about the shift a; a borrower's are its source's Y moments."""
        if self.x_source is None:
            return self._s1, self._g
        return self.x_source._y_moments()

    def _y_moments(self) -> tuple[Tensor, Tensor]:
        """(Σy', Σy'y'ᵀ) about the shift b, with y' = x' + d' (cached per token count)."""
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            s1, g = self._x_moments()
            self._cache = (key, s1 + self.sd, g + self.p + self.p.T + self.q)
        return self._cache[1], self._cache[2]

    def _key(self) -> tuple:
        src = self.x_source._key() if self.x_source is not None else ()
        return (self.n, id(self.q), id(self.b), *src)

    @staticmethod
    def _raw(s1: Tensor, s2: Tensor, a: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Raw (Σv, Σvvᵀ) from (Σv', Σv'v'ᵀ) about the shift a, where v = v' + a."""
        return s1 + n * a, s2 + torch.outer(a, s1) + torch.outer(s1, a) + n * torch.outer(a, a)

    @property
    def sx(self) -> Tensor:
        return self._x_moments()[0] + self.n * self.a

    @property
    def sy(self) -> Tensor:
        return self._y_moments()[0] + self.n * self.b

    @property
    def xx(self) -> Tensor:
        s1, g = self._x_moments()
        return self._raw(s1, g, self.a, self.n)[1]

    @property
    def yy(self) -> Tensor:
        s1, g = self._y_moments()
        return self._raw(s1, g, self.b, self.n)[1]

    @property
    def xy(self) -> Tensor:
        """Raw Σx yᵀ, with x = x' + a and y = x' + d' + b."""
        s1, g = self._x_moments()
        a, b, n = self.a, self.b, self.n
        return (
            g + self.p + torch.outer(s1, b) + torch.outer(a, s1 + self.sd) + n * torch.outer(a, b)
        )

    def owned_tensors(self) -> list[Tensor]:
        """The buffers this object owns (borrowed ones excluded), e.g. for an all-reduce."""
        own = [self.sd, self.p, self.q, self.cos_sum, self.angle_sum]
        if self.x_source is None:
            own += [self._s1, self._g]
        return own

    def _unshifted(self) -> dict[str, Tensor]:
        """This object's buffers re-expressed about zero shifts (d = d' + c, c = b − a)."""
        n, a = self.n, self.a
        c = self.b - a
        s1, g = self._x_moments()
        sd, outer = self.sd, torch.outer
        new = {
            "sd": sd + n * c,
            "b": torch.zeros_like(c),
            "p": self.p + outer(s1, c) + outer(a, sd) + n * outer(a, c),
            "q": self.q + outer(sd, c) + outer(c, sd) + n * outer(c, c),
        }
        if self.x_source is None:
            new["_s1"], new["_g"] = self._raw(s1, g, a, n)
            new["_a"] = torch.zeros_like(a)
        return new

    # -- scores ---------------------------------------------------------------------------
    def centered_xd(self) -> tuple[Tensor, Tensor, Tensor]:
        """(C_xx, C_xd, C_dd): centred second moments (sums, not /N) of X and D = Y − X."""
        if self.n == 0 or self.q is None:
            raise ValueError("no tokens were accumulated")
        s1, g = self._x_moments()
        mx, md = s1 / self.n, self.sd / self.n
        cxx = g - self.n * torch.outer(mx, mx)
        cxd = self.p - self.n * torch.outer(mx, md)
        cdd = self.q - self.n * torch.outer(md, md)
        return cxx, cxd, cdd

    def centered(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return (C_xx, C_xy, C_yy, mean_x, mean_y): centred second moments (sums, not /N)."""
        cxx, cxd, cdd = self.centered_xd()
        s1, _ = self._x_moments()
        cxy = cxx + cxd
        cyy = cxy + cxd.T + cdd
        mx = self.a + s1 / self.n
        my = self.b + (s1 + self.sd) / self.n
        return cxx, cxy, cyy, mx, my

    def scores(self, anisotropy: bool = False) -> dict[str, float]:
        """All per-layer scores, as plain floats.

        Y = X + D, and X explains itself, so regressing Y or D on X leaves one residual,
        R = tr(C_dd − C_dx C_xx⁺ C_xd): linearity = 1 − R/tr(C_yy), and without the residual
        connection 1 − R/tr(C_dd). Both are free of the cancellation in C_yy − C_xy − C_yx + C_xx.
        """
        cxx, cxd, cdd = self.centered_xd()
        pinv = SymmetricPinv(cxx)
        resid = float(torch.trace(cdd)) - pinv.explained(cxd)
        tyy = float(torch.trace(cxx) + 2 * torch.trace(cxd) + torch.trace(cdd))
        tdd = float(torch.trace(cdd))
        cos = float(self.cos_sum / self.n)
        out = {
            "linearity": 1.0 - resid / tyy if tyy > 0.0 else float("nan"),
            "linearity_no_residual": 1.0 - resid / tdd if tdd > 0.0 else float("nan"),
            "cosine": cos,
            "block_influence": 1.0 - cos,
            "angular_distance": float(self.angle_sum / self.n),
        }
        if anisotropy:
            out["anisotropy"] = anisotropy_from_cov(self.centered()[2])
        return out


def unshift_(stats: dict[int, PairStats]) -> None:
    """Re-express every PairStats about zero shifts (exact algebra in float64), so that
    processes whose first batches chose different shifts can sum their moments."""
    new = {i: s._unshifted() for i, s in stats.items() if s.q is not None}  # from the old state
    for i, fields in new.items():
        for k, v in fields.items():
            setattr(stats[i], k, v)
        stats[i]._cache = None


def first_nonfinite(stats: dict[int, PairStats]) -> tuple[int, str] | None:
    """(layer, "input" | "output") of the first pair whose moments hold NaN or inf: one
    overflowing token makes its layer's sums non-finite, so this costs nothing per batch."""
    for i in sorted(stats):
        s = stats[i]
        if s.q is None:
            continue
        if not all(bool(torch.isfinite(t).all()) for t in (s.a, *s._x_moments())):
            return i, "input"
        if not all(bool(torch.isfinite(t).all()) for t in (s.b, s.sd, s.p, s.q)):
            return i, "output"
    return None


def typical_rows(x: Tensor, y: Tensor, factor: float) -> Tensor:
    """Mask of the rows whose ‖x‖ and ‖y‖ both stay within ``factor`` × their median.

    Why: a few tokens (attention sinks, usually the first of each sequence) carry massive
    activations, with norms 100× the rest; they hold ~97% of a middle layer's centred energy
    in SmolLM2, so every Frobenius-normalised score is a score of how those few rows pass the
    layer. Without them the scores describe the text.
    """
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    return (nx <= factor * nx.median()) & (ny <= factor * ny.median())


def row_cosine(x: Tensor, y: Tensor, eps: float = 1e-30) -> Tensor:
    """cos(x_t, y_t) for each row t; a zero row gets cosine 0."""
    dots = (x * y).sum(-1)
    return dots / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)


def cosine_angle_from_norms(
    nx: Tensor, ny: Tensor, nd: Tensor, eps: float = 1e-30
) -> tuple[Tensor, Tensor]:
    """cos and angle of row pairs from ‖x‖, ‖y‖ and ‖y − x‖.

    With s = ‖x̂ − ŷ‖² = (‖y − x‖² − (‖y‖ − ‖x‖)²) / (‖x‖‖y‖), cos = 1 − s/2 and
    angle = 2·asin(√s / 2): both exact to the working precision where arccos(x̂·ŷ) is not
    (cos ≈ 1, as in most layers), and three passes over the rows instead of nine. A zero row
    gets cosine 0 and angle π/2.
    """
    gap = ny - nx
    s = ((nd - gap) * (nd + gap) / (nx * ny).clamp_min(eps)).clamp(0.0, 4.0)
    zero = (nx == 0) | (ny == 0)
    cos = (1.0 - s / 2).masked_fill(zero, 0.0)
    angle = (2 * torch.asin(s.sqrt() / 2)).masked_fill(zero, math.pi / 2)
    return cos, angle


def gram(v: Tensor) -> Tensor:
    """vᵀv in float64, from 3/4 of the products: vᵀv is symmetric, so the top strip and the
    bottom-right block give it all (about 25% less time than one full product)."""
    d = v.shape[1]
    h = d // 2
    top = v[:, :h].T @ v  # (h, d)
    out = torch.empty(d, d, dtype=_F64, device=v.device)
    out[:h] = top
    out[h:, :h] = top[:, h:].T
    out[h:, h:] = v[:, h:].T @ v[:, h:]
    return out


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

    def explained(self, cxy: Tensor) -> float:
        """tr(C_xyᵀ C_xx⁺ C_xy): the part of Y's centred energy that X explains linearly."""
        proj = self.evecs.T @ cxy  # (k, d_y)
        return float((proj.square().sum(1) / self.evals).sum())


def anisotropy_from_cov(cyy: Tensor) -> float:
    """Largest share of variance along one direction: λ_max(C) / tr(C) (llm-microscope's)."""
    total = float(torch.trace(cyy))
    if not total > 0.0:
        return float("nan")
    return float(torch.linalg.eigvalsh(cyy).max()) / total


def procrustes_linearity(x: Tensor, y: Tensor) -> float:
    """The paper's computation on stacked states, kept as the reference our streaming path must
    match: centre, divide by the Frobenius norm, A = pinv(X̃)Ỹ, score = 1 − ‖X̃A − Ỹ‖²."""
    x, y = x.to(_F64), y.to(_F64)
    xc, yc = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    xn, yn = xc / xc.norm(), yc / yc.norm()
    a = torch.linalg.pinv(xn) @ yn
    return float(1.0 - (xn @ a - yn).square().sum())

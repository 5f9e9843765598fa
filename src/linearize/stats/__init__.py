"""Pure tensor math, no model knowledge: streaming moments of paired states and the scores
computed from them (``moments``), and least-squares fits from those moments (``fits``)."""

from linearize.stats.fits import (
    PRIORS,
    AffineMap,
    RegressionStats,
    fit_affine,
    fit_toward,
    relative_error,
)
from linearize.stats.moments import (
    PairStats,
    SymmetricPinv,
    anisotropy_from_cov,
    cosine_angle_from_norms,
    first_nonfinite,
    gram,
    procrustes_linearity,
    row_cosine,
    typical_rows,
    unshift_,
)

__all__ = [
    "PRIORS",
    "AffineMap",
    "PairStats",
    "RegressionStats",
    "SymmetricPinv",
    "anisotropy_from_cov",
    "cosine_angle_from_norms",
    "first_nonfinite",
    "fit_affine",
    "fit_toward",
    "gram",
    "procrustes_linearity",
    "relative_error",
    "row_cosine",
    "typical_rows",
    "unshift_",
]

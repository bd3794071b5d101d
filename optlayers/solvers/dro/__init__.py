"""Inner problems of distributionally robust losses: ``robust_weights`` and the uncertainty sets.

See :mod:`optlayers.solvers.dro._specs` for the conventions and
:mod:`optlayers.solvers.dro.robust_weights` for the solvers, duals and tolerances.
"""

from ._specs import (
    ESRM,
    ChiSquareBall,
    ChiSquarePenalty,
    CressieRead,
    CustomSpectrum,
    CVaR,
    DROSpec,
    Extremile,
    HolisticRobust,
    KLBall,
    KLPenalty,
    Spectral,
    Spectrum,
    Superquantile,
    TotalVariation,
    esrm,
    extremile,
    superquantile,
)
from .robust_weights import DROAux, DRODual, dual_value, robust_weights

__all__ = [
    "robust_weights",
    "dual_value",
    "DROAux",
    "DRODual",
    "DROSpec",
    "CVaR",
    "TotalVariation",
    "ChiSquareBall",
    "ChiSquarePenalty",
    "KLBall",
    "KLPenalty",
    "CressieRead",
    "Spectral",
    "Spectrum",
    "Superquantile",
    "Extremile",
    "ESRM",
    "CustomSpectrum",
    "superquantile",
    "extremile",
    "esrm",
    "HolisticRobust",
]

"""Batched dense QP/LP solvers.

* :class:`InteriorPoint` / :func:`solve_qp` — batched Mehrotra predictor–corrector on the
  homogeneous self-dual embedding, with per-element infeasibility/unboundedness detection.
* :func:`qp_optimality`, :class:`KKTSolve` — the KKT optimality condition and the linear solver
  that reuses the final factorization for implicit gradients (used by
  :func:`optlayers.layers.qp`).
* :class:`QuadraticSmoothing` — the documented smoothing of LP gradients.
"""

from .adjoint import KKTCache, KKTSolve, qp_optimality
from .interior_point import InteriorPoint, QPAux, solve_qp, warm_start_tensors
from .kkt import KKTFactor, factor_kkt, kkt_matvec, solve_kkt
from .lp import QuadraticSmoothing

__all__ = ["InteriorPoint", "QPAux", "solve_qp", "warm_start_tensors", "qp_optimality", "KKTSolve",
           "KKTCache", "KKTFactor", "factor_kkt", "solve_kkt", "kkt_matvec", "QuadraticSmoothing"]

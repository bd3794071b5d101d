"""Sparsity-constrained and quadratically regularized optimal transport (differentiable).

Public names:

* :func:`sparse_ot` — OT with at most ``k`` nonzeros per column (or row) of the plan and a
  quadratic regularization ``(γ/2)‖P‖²`` (Liu, Puigcerver & Blondel, ICLR 2023), solved through
  its semi-dual or dual by L-BFGS or fixed-iteration Adam; implicit gradients.
* :func:`quadratic_ot` — the ``k → ∞`` limit (Blondel, Seguy & Rolet, AISTATS 2018).
* :class:`SparseOTAux`, :class:`SparseTransportPlan` — results; :class:`DualLBFGS`,
  :class:`DualAdam` — solver configurations.
* :func:`sparse_simplex_projection`, :func:`sparsemax` — the batched ``k``-sparse simplex
  projection behind it (kernel ``"sparse_simplex_projection"``: PyTorch, Numba, Triton).
"""

from ._optim import DualAdam, DualLBFGS
from .plan import SparseTransportPlan
from .projection import sparse_simplex_projection, sparsemax
from .sparse_ot import SparseOTAux, quadratic_ot, sparse_ot

__all__ = [
    "sparse_ot", "quadratic_ot", "SparseOTAux", "SparseTransportPlan", "DualLBFGS", "DualAdam",
    "sparse_simplex_projection", "sparsemax",
]

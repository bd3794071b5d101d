r"""Fused evaluation of the (k-sparse) quadratically regularized OT dual: one pass over the cost.

Kernel ``"sparse_ot_dual_grad"``: for ``alpha (B, n)``, ``beta (B, m)``, ``K (B, m, n)`` (row ``j``
of ``K`` is column ``j`` of the cost) and ``kk >= 1``, with
``R_ji = [α_i + β_j − K_ji]_+`` kept only on the ``kk`` largest entries of row ``j``::

    fn(alpha, beta, K, kk) -> (r_n (B, n) = Σ_j R_j·,  r_m (B, m) = Σ_i R_·i,
                               inner (B,) = Σ R ⊙ (K + R/2),  binding (B,) bool)

``binding`` is True where some row has more than ``kk`` positive entries (the top-``kk`` cut is
active). These are the sums behind the dual's value and gradient
(:class:`optlayers.solvers.sparse_ot.dual.DualOracle`). Backends: the PyTorch reference below
(the specification) and Numba (CPU; a single fused pass, rows split over threads). No gradients.

Kernel ``"sparse_ot_dual_lbfgs"`` (Numba only): the whole L-BFGS solve of the semi-dual or dual,
one compiled call per batch (:mod:`optlayers.kernels.sparse_ot_dual_lbfgs_numba`)::

    fn(z0, K, a, b, gamma, kk, *, semi, memory, max_iter, tol, ftol, window, fscale)
        -> (z, iterations (B,) int64, residual (B,), status (B,) int64)

Its specification is the PyTorch loop :func:`optlayers.solvers.sparse_ot._optim.run_lbfgs` with
the oracles above, which :func:`~optlayers.solvers.sparse_ot.sparse_ot` runs wherever this kernel
is not chosen (non-CPU tensors, a forced non-Numba backend, a ``callback``, non-finite data, or
fewer than 4,096 cost entries); the tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._dispatch import Backend, register

__all__ = ["DUAL_KERNEL_NAME", "LBFGS_KERNEL_NAME", "sparse_ot_dual_reference"]

#: Name under which the implementations are registered with the dispatch.
DUAL_KERNEL_NAME = "sparse_ot_dual_grad"
#: The whole L-BFGS solve of the (semi-)dual in one compiled call (Numba only; its PyTorch
#: specification is :func:`optlayers.solvers.sparse_ot._optim.run_lbfgs` driving the oracles, which
#: the solver runs wherever this kernel is not chosen — the tests compare the two).
LBFGS_KERNEL_NAME = "sparse_ot_dual_lbfgs"


def sparse_ot_dual_reference(alpha: torch.Tensor, beta: torch.Tensor, K: torch.Tensor,
                             kk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of the fused dual sums (see the module docstring)."""
    B, m, n = K.shape
    X = alpha[:, None, :] + beta[:, :, None] - K
    binding = torch.zeros(B, dtype=torch.bool, device=K.device)
    if kk < n:
        binding = ((X > 0).sum(-1) > kk).any(-1)
    if bool(binding.any()):
        V, I = torch.topk(X, kk, dim=-1)
        R = V.clamp_min(0)
        r_n = torch.zeros_like(alpha).scatter_add_(1, I.reshape(B, -1), R.reshape(B, -1))
        inner = (R * (torch.gather(K, 2, I) + 0.5 * R)).sum((1, 2))
        return r_n, R.sum(-1), inner, binding
    R = X.clamp_min_(0)
    Rf, Kf = R.reshape(B, 1, -1), K.reshape(B, -1, 1)
    inner = (torch.bmm(Rf, Kf) + 0.5 * torch.bmm(Rf, Rf.transpose(1, 2))).reshape(B)
    return R.sum(1), R.sum(2), inner, binding


def _load_numba() -> Callable[..., Any]:
    from .sparse_ot_dual_numba import sparse_ot_dual_numba

    return sparse_ot_dual_numba


def _load_lbfgs_numba() -> Callable[..., Any]:
    from .sparse_ot_dual_lbfgs_numba import sparse_ot_lbfgs_numba

    return sparse_ot_lbfgs_numba


register(DUAL_KERNEL_NAME, Backend.REFERENCE, lambda: sparse_ot_dual_reference)
register(DUAL_KERNEL_NAME, Backend.NUMBA, _load_numba, min_size=4096)
register(LBFGS_KERNEL_NAME, Backend.NUMBA, _load_lbfgs_numba, min_size=4096)

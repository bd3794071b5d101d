"""The regularized KKT solve of the QP gradient, compiled (Numba; the interior point's kernel is
:mod:`optlayers.kernels.qp_ipm_numba`).

With the factorization ``L Lᵀ = Q + δI + Cᵀ diag(d) C`` that the interior-point kernel hands over
at the solution, the gradient's solves ``dx = (LLᵀ)⁻¹ (rx + Cᵀ(d∘rc))``, ``dc = d∘(C dx − rc)`` run
one element at a time with its factor in cache, instead of as batched triangular solves. Its
specification is :func:`optlayers.solvers.qp.kkt.solve_regularized`; the tests compare the two.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .qp_ipm_numba import _FM, _np

__all__ = ["kkt_solve_numba"]


@numba.njit(cache=True, fastmath=_FM)
def _kkt_solve_range(L, C, d, RX, RC, OX, OC, t, zero, lo, hi):  # pragma: no cover - compiled
    n = L.shape[1]
    kc = C.shape[1]
    V = RX.shape[2]
    for b in range(lo, hi):
        Lb = L[b]
        Cb = C[b if C.shape[0] > 1 else 0]
        db = d[b]
        for v in range(V):
            for i in range(n):
                t[i] = RX[b, i, v]
            for r in range(kc):
                g = db[r] * RC[b, r, v]
                cr = Cb[r]
                for j in range(n):
                    t[j] += g * cr[j]
            for i in range(n):  # L y = t (row dot products)
                li = Lb[i]
                acc = t[i]
                for j in range(i):
                    acc -= li[j] * t[j]
                t[i] = acc / li[i]
            for i in range(n - 1, -1, -1):  # Lᵀ x = y (axpy with the rows of L)
                li = Lb[i]
                xi = t[i] / li[i]
                t[i] = xi
                for j in range(i):
                    t[j] -= xi * li[j]
            for i in range(n):
                OX[b, i, v] = t[i]
            for r in range(kc):
                cr = Cb[r]
                acc = zero
                for j in range(n):
                    acc += cr[j] * t[j]
                OC[b, r, v] = db[r] * (acc - RC[b, r, v])


def kkt_solve_numba(L: torch.Tensor, C: torch.Tensor, d: torch.Tensor, rx: torch.Tensor,
                    rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The regularized KKT solve of :func:`optlayers.solvers.qp.kkt.solve_regularized`, compiled.

    ``dx = (LLᵀ)⁻¹ (rx + Cᵀ(d∘rc))`` and ``dc = d∘(C dx − rc)`` for every element and right-hand
    side: ``L (B, n, n)`` lower, ``C (B|1, k+m, n)``, ``d (B, k+m)``, ``rx (B, n, V)``,
    ``rc (B, k+m, V)`` (CPU, one dtype). One pass per element with its factor in cache, in place
    of the batched triangular solves and products (the gradient's solves with the factorization
    the interior-point kernel handed over). No gradients.
    """
    Ln, Cn, dn, rxn, rcn = _np(L), _np(C), _np(d), _np(rx), _np(rc)
    B, n, V = rxn.shape
    OX = np.empty((B, n, V), dtype=Ln.dtype)
    OC = np.empty(rcn.shape, dtype=Ln.dtype)
    if B and V:
        _kkt_solve_range(Ln, Cn, dn, rxn, rcn, OX, OC, np.empty(n, dtype=Ln.dtype), Ln.dtype.type(0), 0, B)
    return torch.from_numpy(OX), torch.from_numpy(OC)

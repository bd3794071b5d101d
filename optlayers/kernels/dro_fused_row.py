"""One-row entry points of the DRO training fast path that read and write tensors by address.

The common training call is one vector of per-example losses. For it,
:class:`~optlayers.solvers.dro.fused.FusedRunner` passes the losses' and the weights' data
pointers (``Tensor.data_ptr()``) instead of NumPy views. The functions here wrap them as
arrays (:func:`~optlayers.kernels.numba_address.void_pointer`) and run the batch drivers of
:mod:`optlayers.kernels.dro_fused` on that one row. They return the value and the penalty as
numbers, not arrays. A training step then pays no NumPy conversion and no output array around
the kernel. Each conversion is a Python call that costs tens of µs with the caches a model's
forward pass leaves behind.

Contract: ``a_addr`` points to ``n`` contiguous losses, float32 if ``f32`` else float64, and
``p_addr`` to ``n`` writable entries of the same dtype (the weights). Both stay alive for the
call. The results equal those of the batch drivers on a ``(1, n)`` array, bit for bit.

Example:
    >>> import numpy as np, torch
    >>> from optlayers.kernels.dro_fused import CLOSED_KINDS
    >>> from optlayers.kernels.dro_fused_row import closed_row_at
    >>> l = torch.tensor([1.0, 2.0, 3.0, 4.0]); p = torch.empty(4)
    >>> ok, value, penalty = closed_row_at(CLOSED_KINDS["cvar"], True, l.data_ptr(), p.data_ptr(), 4, 0.5, 2.0, 0.0)
    >>> ok, value, p.tolist()
    (True, 3.5, [0.0, 0.0, 0.5, 0.5])
"""

from __future__ import annotations

import numba
import numpy as np

from .dro_fused import fused_closed_batch, fused_root_batch, fused_spectral_batch
from .numba_address import void_pointer

__all__ = ["closed_row_at", "spectral_row_at", "root_row_at"]


@numba.njit(cache=True, error_model="numpy")
def closed_row_at(which, f32, a_addr, p_addr, n, p1, p2, p3):  # pragma: no cover - compiled
    """:func:`~optlayers.kernels.dro_fused.fused_closed_batch` on one row by address. Returns
    ``(ok, value, penalty)``; ``ok`` is False for a non-finite entry."""
    V = np.empty(1)
    D = np.zeros(1)
    if f32:
        A = numba.carray(void_pointer(a_addr), (1, n), np.float32)
        P = numba.carray(void_pointer(p_addr), (1, n), np.float32)
        ok = fused_closed_batch(which, A, p1, p2, p3, P, V, D)
    else:
        A64 = numba.carray(void_pointer(a_addr), (1, n), np.float64)
        P64 = numba.carray(void_pointer(p_addr), (1, n), np.float64)
        ok = fused_closed_batch(which, A64, p1, p2, p3, P64, V, D)
    return ok, V[0], D[0]


@numba.njit(cache=True, error_model="numpy")
def spectral_row_at(f32, a_addr, p_addr, n, w, logw, lam, kl):  # pragma: no cover - compiled
    """:func:`~optlayers.kernels.dro_fused.fused_spectral_batch` on one row by address (the sort
    in the call). Returns ``(ok, value, penalty)``; ``ok`` is False for a non-finite entry."""
    V = np.empty(1)
    D = np.zeros(1)
    if f32:
        A = numba.carray(void_pointer(a_addr), (1, n), np.float32)
        P = numba.carray(void_pointer(p_addr), (1, n), np.float32)
        ok = fused_spectral_batch(A, w, logw, lam, kl, P, V, D)
    else:
        A64 = numba.carray(void_pointer(a_addr), (1, n), np.float64)
        P64 = numba.carray(void_pointer(p_addr), (1, n), np.float64)
        ok = fused_spectral_batch(A64, w, logw, lam, kl, P64, V, D)
    return ok, V[0], D[0]


@numba.njit(cache=True, error_model="numpy")
def root_row_at(which, f32, a_addr, p_addr, n, p1, p2, tol, max_iter, x0):  # pragma: no cover - compiled
    """:func:`~optlayers.kernels.dro_fused.fused_root_batch` on one row by address, warm-started
    at ``x0`` (NaN: cold). Returns ``(status, value, penalty, root)`` (status as there)."""
    V = np.empty(1)
    D = np.zeros(1)
    X = np.full(1, x0)
    if f32:
        A = numba.carray(void_pointer(a_addr), (1, n), np.float32)
        P = numba.carray(void_pointer(p_addr), (1, n), np.float32)
        status = fused_root_batch(which, A, p1, p2, tol, max_iter, X, P, V, D)
    else:
        A64 = numba.carray(void_pointer(a_addr), (1, n), np.float64)
        P64 = numba.carray(void_pointer(p_addr), (1, n), np.float64)
        status = fused_root_batch(which, A64, p1, p2, tol, max_iter, X, P64, V, D)
    return status, V[0], D[0], X[0]

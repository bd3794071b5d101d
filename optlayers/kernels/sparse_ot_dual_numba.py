"""Numba (CPU) kernel of the fused sparse-OT dual sums (see :mod:`optlayers.kernels.sparse_ot_dual`).

Imported only by its loader. One pass over ``K``: each row ``j`` computes
``x_i = α_i + β_j − K_ji`` into a buffer, counts its positive entries, and — only where there are
more than ``kk`` — selects the ``kk`` largest with the bounded heap of
:mod:`optlayers.kernels.sparse_simplex_numba`. Rows are split over threads from
:data:`~optlayers.kernels.sparse_simplex_numba.PARALLEL_MIN` entries on, each thread accumulating
its own ``r_n`` (summed afterwards), so the result does not depend on scheduling.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .sparse_simplex_numba import PARALLEL_MIN, _top_sorted, parallel_launch, parallel_threads

__all__ = ["sparse_ot_dual_numba"]


@numba.njit(cache=True)
def _dual_rows(alpha, beta, K, kk, b, j0, j1, acc, r_m):  # pragma: no cover - compiled
    """Rows ``j0 <= j < j1`` of problem ``b``; adds to ``acc (n,)``; returns ``(inner, binding)``."""
    n = K.shape[2]
    al = alpha[b]
    buf = np.empty(n, dtype=K.dtype)
    width = kk if kk < n else 1
    hv = np.empty(width, dtype=K.dtype)
    hi = np.empty(width, dtype=np.int64)
    inner = 0.0
    binding = False
    for j in range(j0, j1):
        bj = beta[b, j]
        row = K[b, j]
        s = 0.0
        if kk >= n:
            for i in range(n):
                x = al[i] + bj - row[i]
                if x > 0.0:
                    acc[i] += x
                    s += x
                    inner += x * (row[i] + 0.5 * x)
        else:
            cnt = 0
            for i in range(n):
                x = al[i] + bj - row[i]
                buf[i] = x
                if x > 0.0:
                    cnt += 1
            if cnt <= kk:
                for i in range(n):
                    x = buf[i]
                    if x > 0.0:
                        acc[i] += x
                        s += x
                        inner += x * (row[i] + 0.5 * x)
            else:
                binding = True
                _top_sorted(buf, kk, hv, hi)
                for t in range(kk):
                    x = hv[t]
                    if x > 0.0:
                        i = hi[t]
                        acc[i] += x
                        s += x
                        inner += x * (row[i] + 0.5 * x)
        r_m[b, j] = s
    return inner, binding


@numba.njit(cache=True)
def _dual_serial(alpha, beta, K, kk, r_n, r_m, inner, binding):  # pragma: no cover - compiled
    B, m, _ = K.shape
    for b in range(B):
        v, bind = _dual_rows(alpha, beta, K, kk, b, 0, m, r_n[b], r_m)
        inner[b] = v
        binding[b] = bind


@numba.njit(cache=True, parallel=True)
def _dual_parallel(alpha, beta, K, kk, r_n, r_m, inner, binding, chunks):  # pragma: no cover - compiled
    B, m, n = K.shape
    acc = np.zeros((chunks, n), dtype=K.dtype)
    part = np.zeros(chunks)
    pbind = np.zeros(chunks, dtype=np.bool_)
    for b in range(B):
        acc[:] = 0.0
        for c in numba.prange(chunks):
            v, bind = _dual_rows(alpha, beta, K, kk, b, c * m // chunks, (c + 1) * m // chunks, acc[c], r_m)
            part[c] = v
            pbind[c] = bind
        tot = 0.0
        anyb = False
        for c in range(chunks):
            tot += part[c]
            anyb = anyb or pbind[c]
            for i in range(n):
                r_n[b, i] += acc[c, i]
        inner[b] = tot
        binding[b] = anyb


def sparse_ot_dual_numba(alpha: torch.Tensor, beta: torch.Tensor, K: torch.Tensor,
                         kk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused sparse-OT dual sums on CPU tensors (Numba)."""
    dtype = K.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    Kn = np.ascontiguousarray(K.detach().to(work).numpy())
    an = np.ascontiguousarray(alpha.detach().to(work).numpy())
    bn = np.ascontiguousarray(beta.detach().to(work).numpy())
    B, m, n = Kn.shape
    r_n = np.zeros((B, n), dtype=Kn.dtype)
    r_m = np.zeros((B, m), dtype=Kn.dtype)
    inner = np.zeros(B, dtype=np.float64)
    binding = np.zeros(B, dtype=np.bool_)
    threads = parallel_threads() if m * n >= PARALLEL_MIN and m > 1 else 1
    if threads > 1:
        parallel_launch(_dual_parallel, threads, an, bn, Kn, int(kk), r_n, r_m, inner, binding, min(m, 4 * threads))
    elif B:
        _dual_serial(an, bn, Kn, int(kk), r_n, r_m, inner, binding)
    return (torch.from_numpy(r_n).to(dtype), torch.from_numpy(r_m).to(dtype),
            torch.from_numpy(inner).to(dtype), torch.from_numpy(binding))

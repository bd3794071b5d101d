"""Numba (CPU) kernel of the ``k``-sparse simplex projection.

Imported only by the loader registered in :mod:`optlayers.kernels.sparse_simplex` (importing
optlayers never imports Numba). Same signature and result as
:func:`optlayers.kernels.sparse_simplex.sparse_simplex_reference`; rows run in parallel.

Per row, for ``kk = min(k, n)``:

* ``kk <= 64`` (the common case: sparse plans, MoE capacities): one pass keeping the ``kk``
  largest entries in a bounded min-heap (``O(n log kk)``, usually one comparison per entry),
  then heap-sort of those ``kk``;
* otherwise: an ``O(n log n)`` argsort of the row;

then the threshold ``τ`` from the sorted prefix sums, exactly as the reference. Slots are
sorted by decreasing ``x``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .sparse_simplex import check_kernel_args

__all__ = ["sparse_simplex_numba", "HEAP_MAX"]

#: Largest ``kk`` handled by the bounded-heap selection.
HEAP_MAX = 64


@numba.njit(cache=True, inline="always")
def _sift_down(hv, hi, size, pos):  # pragma: no cover - compiled
    """Restore the min-heap property of ``hv[:size]`` below ``pos`` (``hi`` follows ``hv``)."""
    v = hv[pos]
    ix = hi[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and hv[child + 1] < hv[child]:
            child += 1
        if hv[child] < v:
            hv[pos] = hv[child]
            hi[pos] = hi[child]
            pos = child
        else:
            break
    hv[pos] = v
    hi[pos] = ix


@numba.njit(cache=True)
def _top_sorted(row, kk, hv, hi):  # pragma: no cover - compiled
    """The ``kk`` largest entries of ``row`` into ``hv``/``hi``, sorted decreasingly."""
    n = row.shape[0]
    if kk > HEAP_MAX:
        order = np.argsort(row)
        for j in range(kk):
            ix = order[n - 1 - j]
            hv[j] = row[ix]
            hi[j] = ix
        return
    for j in range(kk):
        hv[j] = row[j]
        hi[j] = j
    for p in range(kk // 2 - 1, -1, -1):
        _sift_down(hv, hi, kk, p)
    for i in range(kk, n):
        v = row[i]
        if v > hv[0]:
            hv[0] = v
            hi[0] = i
            _sift_down(hv, hi, kk, 0)
    # heap sort of a min-heap: decreasing order
    for end in range(kk - 1, 0, -1):
        tv = hv[0]
        ti = hi[0]
        hv[0] = hv[end]
        hi[0] = hi[end]
        hv[end] = tv
        hi[end] = ti
        _sift_down(hv, hi, end, 0)


@numba.njit(cache=True, parallel=True)
def _project_rows(x, kk, s, out_v, out_i):  # pragma: no cover - compiled
    R = x.shape[0]
    for r in numba.prange(R):
        hv = out_v[r]
        hi = out_i[r]
        _top_sorted(x[r], kk, hv, hi)
        sr = s[r]
        css = 0.0
        rho = 0
        cs_rho = 0.0
        for j in range(kk):
            css += hv[j]
            if hv[j] * (j + 1) > css - sr:
                rho += 1
                cs_rho = css
        if rho == 0:  # only when s < 0 or non-finite data; mirror the reference's clamp
            rho = 1
            cs_rho = hv[0]
        tau = (cs_rho - sr) / rho
        for j in range(kk):
            d = hv[j] - tau
            hv[j] = d if d > 0.0 else 0.0


def sparse_simplex_numba(x: torch.Tensor, k: int, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``-sparse simplex projection of the rows of a CPU tensor (Numba)."""
    kk = check_kernel_args(x, k, s)
    if x.device.type != "cpu":
        raise ValueError(f"the numba kernel needs CPU tensors, got {x.device}")
    dtype = x.dtype
    work = x.detach()
    if dtype not in (torch.float32, torch.float64):
        work = work.float()
    a = np.ascontiguousarray(work.numpy())
    ss = np.ascontiguousarray(s.detach().to(work.dtype).cpu().numpy())
    R = a.shape[0]
    values = np.empty((R, kk), dtype=a.dtype)
    indices = np.empty((R, kk), dtype=np.int64)
    if R:
        _project_rows(a, kk, ss, values, indices)
    return torch.from_numpy(values).to(dtype), torch.from_numpy(indices)

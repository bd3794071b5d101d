"""Numba (CPU) kernel of the ``k``-sparse simplex projection.

Imported only by the loader registered in :mod:`optlayers.kernels.sparse_simplex` (importing
optlayers never imports Numba). Same signature and result as
:func:`optlayers.kernels.sparse_simplex.sparse_simplex_reference`; rows run in parallel.

Per row, for ``kk = min(k, n)``:

* ``kk <= 64`` (the common case: sparse plans, MoE capacities): one pass keeping the ``kk``
  largest entries in a bounded min-heap (``O(n log kk)``, usually one comparison per entry),
  then heap-sort of those ``kk``;
* otherwise: quickselect of the ``kk`` largest (``O(n)`` expected), then an argsort of those;

then the threshold ``τ`` from the sorted prefix sums, exactly as the reference. Slots are
sorted by decreasing ``x``. Rows are split over Numba's threads from :data:`PARALLEL_MIN`
entries on, using at most ``torch.get_num_threads()`` of them (:func:`parallel_launch`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .sparse_simplex import check_kernel_args

__all__ = ["sparse_simplex_numba", "HEAP_MAX", "PARALLEL_MIN", "parallel_threads", "parallel_launch"]

#: Largest ``kk`` handled by the bounded-heap selection.
HEAP_MAX = 64
#: Entries ``R * n`` from which rows are split over Numba's threads. Below, the fork/join costs
#: more than it saves — on a shared 2-core machine even a 4-million-entry problem ran several
#: times slower in parallel than serially — so only very large problems go parallel.
PARALLEL_MIN = 1 << 24


def parallel_threads() -> int:
    """Threads for a parallel kernel launch: ``min(torch.get_num_threads(), Numba's)``.

    Starting Numba's OpenMP thread pool (which ``numba.get_num_threads()`` does on first use)
    resets OpenMP's thread count — the one PyTorch's intra-op parallelism reads — to Numba's
    default: the caller's ``torch.set_num_threads`` is restored here, and with one torch thread
    Numba's pool is never started.
    """
    t = torch.get_num_threads()
    if t <= 1:
        return 1
    n = numba.get_num_threads()
    if torch.get_num_threads() != t:
        torch.set_num_threads(t)
    return min(t, n)


def parallel_launch(fn, threads: int, *args):  # type: ignore[no-untyped-def]
    """Run the ``parallel=True`` function ``fn(*args)`` on ``threads`` Numba threads, leaving
    Numba's and PyTorch's thread settings as they were."""
    t, old = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(old)
        if torch.get_num_threads() != t:
            torch.set_num_threads(t)


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
def _select_desc(row, idx, kk):  # pragma: no cover - compiled
    """Permute ``idx`` so that ``idx[:kk]`` indexes the ``kk`` largest entries (quickselect)."""
    lo = 0
    hi = idx.shape[0] - 1
    target = kk - 1
    while hi > lo:
        mid = (lo + hi) // 2
        x, y, z = row[idx[lo]], row[idx[mid]], row[idx[hi]]
        if (x >= y) == (y >= z):
            pivot = y
        elif (y >= x) == (x >= z):
            pivot = x
        else:
            pivot = z
        i = lo
        j = hi
        while i <= j:
            while row[idx[i]] > pivot:
                i += 1
            while row[idx[j]] < pivot:
                j -= 1
            if i <= j:
                t = idx[i]
                idx[i] = idx[j]
                idx[j] = t
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return


@numba.njit(cache=True)
def _top_sorted(row, kk, hv, hi):  # pragma: no cover - compiled
    """The ``kk`` largest entries of ``row`` into ``hv``/``hi``, sorted decreasingly."""
    n = row.shape[0]
    if kk > HEAP_MAX:
        idx = np.arange(n)
        if kk < n:
            _select_desc(row, idx, kk)
        sel = np.empty(kk, dtype=row.dtype)
        for j in range(kk):
            sel[j] = -row[idx[j]]
        order = np.argsort(sel)
        for j in range(kk):
            ix = idx[order[j]]
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
    heap_sort_desc(hv, hi, kk)


@numba.njit(cache=True, inline="always")
def heap_sort_desc(hv, hi, size):  # pragma: no cover - compiled
    """Sort a min-heap ``hv[:size]`` (with its indices ``hi``) into decreasing order, in place."""
    for end in range(size - 1, 0, -1):
        tv = hv[0]
        ti = hi[0]
        hv[0] = hv[end]
        hi[0] = hi[end]
        hv[end] = tv
        hi[end] = ti
        _sift_down(hv, hi, end, 0)


@numba.njit(cache=True, inline="always")
def insertion_sort_desc(hv, hi, size):  # pragma: no cover - compiled
    """Sort ``hv[:size]`` (with its indices ``hi``) into decreasing order, in place (small sizes)."""
    for t in range(1, size):
        v = hv[t]
        ix = hi[t]
        s = t - 1
        while s >= 0 and hv[s] < v:
            hv[s + 1] = hv[s]
            hi[s + 1] = hi[s]
            s -= 1
        hv[s + 1] = v
        hi[s + 1] = ix


@numba.njit(cache=True, inline="always")
def sorted_threshold(hv, size, sr):  # pragma: no cover - compiled
    """The simplex threshold ``τ`` of the ``size`` largest values ``hv`` (sorted decreasingly) for
    mass ``sr``: ``Σ_j max(hv_j − τ, 0) = sr`` over the support ``ρ = #{j: hv_j (j+1) > Σ_{t≤j} hv_t − sr}``."""
    css = 0.0
    rho = 0
    cs_rho = 0.0
    for j in range(size):
        css += hv[j]
        if hv[j] * (j + 1) > css - sr:
            rho += 1
            cs_rho = css
    if rho == 0:  # only when s < 0 or non-finite data; mirror the reference's clamp
        rho = 1
        cs_rho = hv[0]
    return (cs_rho - sr) / rho


@numba.njit(cache=True)
def _project_row(row, kk, sr, hv, hi):  # pragma: no cover - compiled
    _top_sorted(row, kk, hv, hi)
    tau = sorted_threshold(hv, kk, sr)
    for j in range(kk):
        d = hv[j] - tau
        hv[j] = d if d > 0.0 else 0.0


@numba.njit(cache=True)
def _project_range(x, kk, s, out_v, out_i, offset, r0, r1):  # pragma: no cover - compiled
    """Rows ``r0 <= r < r1``; with ``offset`` (``G >= 1`` rows) project ``offset[g(r)] − x[r]``."""
    G = offset.shape[0]
    if G == 0:
        for r in range(r0, r1):
            _project_row(x[r], kk, s[r], out_v[r], out_i[r])
        return
    n = x.shape[1]
    per = x.shape[0] // G
    buf = np.empty(n, dtype=x.dtype)
    for r in range(r0, r1):
        off = offset[r // per]
        xr = x[r]
        for i in range(n):
            buf[i] = off[i] - xr[i]
        _project_row(buf, kk, s[r], out_v[r], out_i[r])


@numba.njit(cache=True)
def _project_rows(x, kk, s, out_v, out_i, offset):  # pragma: no cover - compiled
    _project_range(x, kk, s, out_v, out_i, offset, 0, x.shape[0])


@numba.njit(cache=True, parallel=True)
def _project_rows_parallel(x, kk, s, out_v, out_i, offset, chunks):  # pragma: no cover - compiled
    R = x.shape[0]
    for c in numba.prange(chunks):
        _project_range(x, kk, s, out_v, out_i, offset, c * R // chunks, (c + 1) * R // chunks)


def sparse_simplex_numba(x: torch.Tensor, k: int, s: torch.Tensor,
                         offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``-sparse simplex projection of the rows of a CPU tensor (Numba)."""
    kk = check_kernel_args(x, k, s, offset)
    if x.device.type != "cpu":
        raise ValueError(f"the numba kernel needs CPU tensors, got {x.device}")
    dtype = x.dtype
    work = x.detach()
    if dtype not in (torch.float32, torch.float64):
        work = work.float()
    a = np.ascontiguousarray(work.numpy())
    ss = np.ascontiguousarray(s.detach().to(work.dtype).cpu().numpy())
    if offset is None:
        off = np.empty((0, a.shape[1]), dtype=a.dtype)
    else:
        off = np.ascontiguousarray(offset.detach().to(work.dtype).cpu().numpy())
    R = a.shape[0]
    values = np.empty((R, kk), dtype=a.dtype)
    indices = np.empty((R, kk), dtype=np.int64)
    threads = parallel_threads() if R * a.shape[1] >= PARALLEL_MIN and R > 1 else 1
    if threads > 1:
        parallel_launch(_project_rows_parallel, threads, a, kk, ss, values, indices, off, min(R, 4 * threads))
    elif R:
        _project_rows(a, kk, ss, values, indices, off)
    return torch.from_numpy(values).to(dtype), torch.from_numpy(indices)

"""Numba (CPU) kernels of Sinkhorn's hot loops: fused soft-min and transport-apply.

Imported only by the loaders registered in :mod:`optlayers.kernels.softmin` (importing optlayers
never imports Numba). Same signatures and results as the PyTorch reference
(:func:`optlayers.kernels.softmin_reference.softmin_fast`,
:func:`~optlayers.kernels.softmin_reference.kernel_apply_fast`).

Each row ``i`` of each problem is one task of a ``prange`` loop (blocks of rows per thread). For
a row, the exponents ``z_j = (h_j − C_ij)/ε`` are written once to a row buffer (the cost is read
from the stored matrix or computed from the coordinates, with ``y`` stored coordinate-major so
the loops over ``j`` vectorize), then ``−ε (log Σ_j e^{z_j − s} + s)`` with ``s = max_j z_j``
(``s = 0`` when the maximum is not finite, like ``torch.logsumexp``). The exponential is
Numba's scalar ``exp`` (no SVML here), which is what limits it: the measured comparison with the
Inductor-compiled reduction is in ``benchmarks/bench_kernels.py``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange

from .softmin_reference import CostSource, DenseSource, PNormSource, SqEuclideanSource

__all__ = ["softmin_numba", "kernel_apply_numba"]

_ROWS = 16  # rows per parallel task


@numba.njit(cache=True, inline="always")
def _row_exponents(kind, b, i, x, yt, c, h, inv, scale, half_p, buf):  # noqa: ANN001, ANN202
    m = h.shape[1]
    if kind == 0:
        for j in range(m):
            buf[j] = (h[b, j] - c[b, i, j]) * inv
        return
    for j in range(m):
        buf[j] = 0.0
    d = x.shape[2]
    for k in range(d):
        xk = x[b, i, k]
        for j in range(m):
            t = xk - yt[b, k, j]
            buf[j] += t * t
    if kind == 1:
        for j in range(m):
            buf[j] = (h[b, j] - scale * buf[j]) * inv
    else:
        for j in range(m):
            d2 = buf[j]
            cj = scale * math.exp(half_p * math.log(d2)) if d2 > 0 else 0.0
            buf[j] = (h[b, j] - cj) * inv


@numba.njit(parallel=True, cache=True)
def _softmin_rows(kind, x, yt, c, h, eps, scale, half_p, out):  # noqa: ANN001, ANN202
    B, m = h.shape
    n = out.shape[1]
    nblk = (n + _ROWS - 1) // _ROWS
    for task in prange(B * nblk):
        b = task // nblk
        i0 = (task % nblk) * _ROWS
        buf = np.empty(m, dtype=out.dtype)
        e = eps[b]
        inv = 1.0 / e
        for i in range(i0, min(n, i0 + _ROWS)):
            _row_exponents(kind, b, i, x, yt, c, h, inv, scale, half_p, buf)
            mx = -np.inf
            for j in range(m):
                if buf[j] > mx:
                    mx = buf[j]
            sh = mx if (mx > -np.inf and mx < np.inf) else 0.0
            acc = 0.0
            for j in range(m):
                acc += math.exp(buf[j] - sh)
            out[b, i] = -e * (math.log(acc) + sh) if acc > 0 else (np.inf if acc == 0 else -e * math.log(acc))


@numba.njit(parallel=True, cache=True)
def _apply_rows(kind, x, yt, c, alpha, beta, eps, v, scale, half_p, out):  # noqa: ANN001, ANN202
    B, n = alpha.shape
    m = beta.shape[1]
    k = v.shape[2]
    nblk = (n + _ROWS - 1) // _ROWS
    for task in prange(B * nblk):
        b = task // nblk
        i0 = (task % nblk) * _ROWS
        buf = np.empty(m, dtype=out.dtype)
        e = eps[b]
        inv = 1.0 / e
        hb = np.empty((1, m), dtype=out.dtype)
        for j in range(m):
            hb[0, j] = beta[b, j] * e
        for i in range(i0, min(n, i0 + _ROWS)):
            a_i = alpha[b, i]
            if a_i != a_i:
                a_i = -np.inf
            _row_exponents_h(kind, b, i, x, yt, c, hb, inv, scale, half_p, buf)
            for kk in range(k):
                out[b, i, kk] = 0.0
            for j in range(m):
                p = math.exp(a_i + buf[j])
                if p != 0.0:
                    for kk in range(k):
                        out[b, i, kk] += p * v[b, j, kk]


@numba.njit(cache=True, inline="always")
def _row_exponents_h(kind, b, i, x, yt, c, hb, inv, scale, half_p, buf):  # noqa: ANN001, ANN202
    """Like :func:`_row_exponents` with one shared row ``hb (1, m)`` of ``h = β ε``."""
    m = hb.shape[1]
    if kind == 0:
        for j in range(m):
            buf[j] = (hb[0, j] - c[b, i, j]) * inv
        return
    for j in range(m):
        buf[j] = 0.0
    d = x.shape[2]
    for k in range(d):
        xk = x[b, i, k]
        for j in range(m):
            t = xk - yt[b, k, j]
            buf[j] += t * t
    if kind == 1:
        for j in range(m):
            buf[j] = (hb[0, j] - scale * buf[j]) * inv
    else:
        for j in range(m):
            d2 = buf[j]
            cj = scale * math.exp(half_p * math.log(d2)) if d2 > 0 else 0.0
            buf[j] = (hb[0, j] - cj) * inv


def _alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Output allocation (the tests replace it with a NaN-filled one to prove every entry is written)."""
    return np.empty(shape, dtype=dtype)


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _source_arrays(source: CostSource, dtype: torch.dtype) -> tuple[int, np.ndarray, np.ndarray, np.ndarray,
                                                                    float, float]:
    dummy = np.zeros((1, 1, 1), dtype=np.float64 if dtype == torch.float64 else np.float32)
    if isinstance(source, DenseSource):
        return 0, dummy, dummy, _np(source.cost, dtype), 1.0, 1.0
    if isinstance(source, (SqEuclideanSource, PNormSource)):
        x = _np(source.x, dtype)
        yt = _np(source.y.transpose(-1, -2), dtype)
        if isinstance(source, SqEuclideanSource):
            return 1, x, yt, dummy, float(source.scale), 1.0
        return 2, x, yt, dummy, float(source.scale), 0.5 * float(source.p)
    raise ValueError(f"the numba kernels take a dense, squared-Euclidean or p-norm cost, got "
                     f"{type(source).__name__}; user costs run on the reference backend")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def softmin_numba(source: CostSource, h: torch.Tensor, eps: torch.Tensor, *,
                  block_elements: int | None = None) -> torch.Tensor:
    """``−ε log Σ_j exp((h_j − C_ij)/ε)``, ``(B, n)`` (Numba, parallel over rows)."""
    del block_elements
    if h.device.type != "cpu":
        raise ValueError("the numba soft-min runs on CPU tensors")
    wd = _work_dtype(h.dtype)
    kind, x, yt, c, scale, half_p = _source_arrays(source, wd)
    B = h.shape[0]
    out = _alloc((B, source.n), np.dtype(np.float64 if wd == torch.float64 else np.float32))
    if out.size:
        _softmin_rows(kind, x, yt, c, _np(h, wd), _np(eps.reshape(B), wd), scale, half_p, out)
    return torch.from_numpy(out).to(h.dtype)


@torch.no_grad()
def kernel_apply_numba(source: CostSource, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                       v: torch.Tensor, *, block_elements: int | None = None) -> torch.Tensor:
    """``Σ_j exp(α_i + β_j − C_ij/ε) v_jk``, ``(B, n, k)`` (Numba, parallel over rows)."""
    del block_elements
    if alpha.device.type != "cpu":
        raise ValueError("the numba transport-apply runs on CPU tensors")
    wd = _work_dtype(alpha.dtype)
    kind, x, yt, c, scale, half_p = _source_arrays(source, wd)
    B, n = alpha.shape
    out = _alloc((B, n, v.shape[-1]), np.dtype(np.float64 if wd == torch.float64 else np.float32))
    if out.size:
        _apply_rows(kind, x, yt, c, _np(alpha, wd), _np(beta, wd), _np(eps.reshape(B), wd), _np(v, wd),
                    scale, half_p, out)
    return torch.from_numpy(out).to(alpha.dtype)

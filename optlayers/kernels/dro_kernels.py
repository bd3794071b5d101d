"""Numba (CPU) kernels of the exact DRO inner solvers.

Imported only by the loaders registered in :mod:`optlayers.solvers.dro` (importing optlayers
never imports Numba). Each function takes and returns torch tensors with the signature of its
PyTorch reference, which is the specification:

* ``cvar_numba(L, alpha) -> (p, tau)`` — :func:`optlayers.solvers.dro.cvar.cvar_reference`;
  quickselect and one pass, :math:`O(n)` per row;
* ``chi2_ball_numba(L, rho) -> (p, eta, c)`` —
  :func:`optlayers.solvers.dro.chi_square.chi2_ball_reference`; NumPy's sort, then a Welford
  scan over support sizes that stops at the first consistent one;
* ``perm_proj_l2_numba(z, w) -> q``, ``perm_proj_kl_numba(z, w) -> q`` — projections onto the
  permutahedron by NumPy's argsort and pool adjacent violators
  (:mod:`optlayers.solvers.dro.spectral`).

Sorting is done by NumPy outside the compiled loops: its SIMD sort is an order of magnitude
faster than Numba's (and than ``torch.sort`` on CPU).

Inputs are ``(B, n)`` float64 CPU tensors; rows are independent.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

__all__ = ["cvar_numba", "chi2_ball_numba", "perm_proj_l2_numba", "perm_proj_kl_numba"]


@numba.njit(cache=True)
def _select_desc(a, k):  # pragma: no cover - compiled
    """The k-th largest entry (1-based) of ``a`` (modified in place): iterative quickselect."""
    lo = 0
    hi = a.shape[0] - 1
    target = k - 1  # index in descending order
    while hi > lo:
        mid = (lo + hi) // 2
        # median of three as pivot
        x, y, z = a[lo], a[mid], a[hi]
        if (x >= y) == (y >= z):
            pivot = y
        elif (y >= x) == (x >= z):
            pivot = x
        else:
            pivot = z
        i = lo
        j = hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]
    return a[target]


@numba.njit(cache=True)
def _cvar_rows(L, alpha, k, p, tau):  # pragma: no cover - compiled
    B, n = L.shape
    cap = 1.0 / (alpha * n)
    for b in range(B):
        row = L[b]
        t = _select_desc(row.copy(), k)
        n_above = 0
        n_tied = 0
        for i in range(n):
            if row[i] > t:
                n_above += 1
            elif row[i] == t:
                n_tied += 1
        rest = (1.0 - cap * n_above) / n_tied
        for i in range(n):
            if row[i] > t:
                p[b, i] = cap
            elif row[i] == t:
                p[b, i] = rest
            else:
                p[b, i] = 0.0
        tau[b] = t


def cvar_numba(L: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact CVaR weights (Numba)."""
    from ..solvers.dro.cvar import cvar_k

    a = np.ascontiguousarray(L.detach().cpu().numpy())
    B, n = a.shape
    p = np.empty_like(a)
    tau = np.empty(B, dtype=a.dtype)
    _cvar_rows(a, float(alpha), cvar_k(alpha, n), p, tau)
    return torch.from_numpy(p), torch.from_numpy(tau)


@numba.njit(cache=True)
def _chi2_rows(L, S, rho, p, eta_out, c_out):  # pragma: no cover - compiled
    B, n = L.shape
    for b in range(B):
        row = L[b]
        s = S[b]  # row sorted in descending order
        lmax = row.max()
        n_top = 0
        for i in range(n):
            if row[i] == lmax:
                n_top += 1
        if rho >= n / n_top - 1.0:
            for i in range(n):
                p[b, i] = 1.0 / n_top if row[i] == lmax else 0.0
            eta_out[b] = lmax
            c_out[b] = np.inf
            continue
        mean = 0.0
        m2 = 0.0
        best = np.inf
        best_c = 0.0
        best_eta = 0.0
        for k in range(1, n + 1):
            d = s[k - 1] - lmax
            delta = d - mean
            mean += delta / k
            m2 += delta * (d - mean)
            var = m2 / k
            need = (1.0 + rho) / n - 1.0 / k
            if need < -1e-15 or var <= 0.0:
                continue
            if need < 0.0:
                need = 0.0
            c = math.sqrt(need / (k * var))
            if c == 0.0 or not math.isfinite(c):
                continue
            e = mean - 1.0 / (k * c)
            if not math.isfinite(e):
                continue
            nxt = s[k] - lmax if k < n else -np.inf
            viol = max(0.0, nxt - e) + max(0.0, e - d)
            if viol < best:
                best = viol
                best_c = c
                best_eta = e
                if viol == 0.0:
                    break
        e = best_eta + lmax
        tot = 0.0
        for i in range(n):
            v = best_c * (row[i] - e)
            v = v if v > 0.0 else 0.0
            p[b, i] = v
            tot += v
        for i in range(n):
            p[b, i] /= tot
        eta_out[b] = e
        c_out[b] = best_c


def chi2_ball_numba(L: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact chi-square-ball weights (Numba)."""
    a = np.ascontiguousarray(L.detach().cpu().numpy())
    B, n = a.shape
    if rho <= 0.0:
        return (torch.full((B, n), 1.0 / n, dtype=torch.float64), torch.full((B,), -math.inf, dtype=torch.float64),
                torch.zeros(B, dtype=torch.float64))
    S = np.empty_like(a)
    for b in range(B):  # NumPy's (SIMD) sort is much faster than Numba's
        S[b] = np.sort(a[b])[::-1]
    p = np.empty_like(a)
    eta = np.empty(B, dtype=a.dtype)
    c = np.empty(B, dtype=a.dtype)
    _chi2_rows(a, S, float(rho), p, eta, c)
    return torch.from_numpy(p), torch.from_numpy(eta), torch.from_numpy(c)


@numba.njit(cache=True)
def _perm_l2_rows(Z, order, w, out):  # pragma: no cover - compiled
    """Euclidean projection of each row onto the permutahedron of ``w`` (descending)."""
    B, n = Z.shape
    sums = np.empty(n)
    cnt = np.empty(n, dtype=np.int64)
    for b in range(B):
        top = -1
        for i in range(n):
            top += 1
            sums[top] = Z[b, order[b, i]] - w[i]
            cnt[top] = 1
            while top > 0 and sums[top - 1] * cnt[top] <= sums[top] * cnt[top - 1]:
                sums[top - 1] += sums[top]
                cnt[top - 1] += cnt[top]
                top -= 1
        j = 0
        tot = 0.0
        for blk in range(top + 1):
            v = sums[blk] / cnt[blk]
            for _ in range(cnt[blk]):
                k = order[b, j]
                q = Z[b, k] - v
                q = q if q > 0.0 else 0.0
                out[b, k] = q
                tot += q
                j += 1
        for i in range(n):
            out[b, i] /= tot


@numba.njit(cache=True)
def _logaddexp(a, b):  # pragma: no cover - compiled
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


@numba.njit(cache=True)
def _perm_kl_rows(Z, order, w, out):  # pragma: no cover - compiled
    """KL projection of each row onto the permutahedron of ``w`` (descending)."""
    B, n = Z.shape
    lse = np.empty(n)
    ws = np.empty(n)
    val = np.empty(n)
    cnt = np.empty(n, dtype=np.int64)
    for b in range(B):
        top = -1
        for i in range(n):
            z = Z[b, order[b, i]]
            top += 1
            lse[top] = z
            ws[top] = w[i]
            val[top] = z - math.log(w[i]) if w[i] > 0 else np.inf
            cnt[top] = 1
            while top > 0 and val[top - 1] <= val[top]:
                lse[top - 1] = _logaddexp(lse[top - 1], lse[top])
                ws[top - 1] += ws[top]
                cnt[top - 1] += cnt[top]
                val[top - 1] = lse[top - 1] - math.log(ws[top - 1]) if ws[top - 1] > 0 else np.inf
                top -= 1
        j = 0
        tot = 0.0
        for blk in range(top + 1):
            for _ in range(cnt[blk]):
                k = order[b, j]
                q = math.exp(Z[b, k] - val[blk])
                out[b, k] = q
                tot += q
                j += 1
        for i in range(n):
            out[b, i] /= tot


def _desc_order(a: np.ndarray) -> np.ndarray:
    order = np.empty(a.shape, dtype=np.int64)
    for b in range(a.shape[0]):
        order[b] = np.argsort(-a[b])
    return order


def perm_proj_l2_numba(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``z`` onto the permutahedron of ``w`` (Numba)."""
    a = np.ascontiguousarray(z.detach().cpu().numpy())
    wa = np.ascontiguousarray(w.detach().cpu().numpy().astype(np.float64))
    out = np.empty_like(a)
    _perm_l2_rows(a, _desc_order(a), wa, out)
    return torch.from_numpy(out)


def perm_proj_kl_numba(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """KL projection of each row of ``z`` onto the permutahedron of ``w`` (Numba)."""
    a = np.ascontiguousarray(z.detach().cpu().numpy())
    wa = np.ascontiguousarray(w.detach().cpu().numpy().astype(np.float64))
    out = np.empty_like(a)
    _perm_kl_rows(a, _desc_order(a), wa, out)
    return torch.from_numpy(out)

r"""Numba (CPU) kernel: the whole L-BFGS solve of the (k-sparse) quadratically regularized OT
(semi-)dual, one compiled call per batch.

Imported only by its loader (:mod:`optlayers.kernels.sparse_ot_dual`). For each problem ``b`` it
runs, on float64 copies of the data, exactly the iteration of
:func:`optlayers.solvers.sparse_ot._optim.run_lbfgs` (the PyTorch specification, synchronised
mode): L-BFGS two-loop direction, the weak-Wolfe line search on the directional derivative of the
convex ``f = −D``, the L1 marginal-violation test and, where ``k`` binds, the stall test — with the
value and gradient evaluated in one fused pass over the cost:

* semi-dual (``z = α``, ``n`` entries): per row ``j`` of ``K`` the ``k``-sparse simplex
  projection of ``x = (α − K_j)/γ`` onto mass ``b_j``. Its support lies in
  ``{i : x_i ≥ max x − b_j}`` (the threshold ``τ`` is at least ``max x − b_j``), so one pass
  collects those candidates (against the running maximum: a superset) and only they are sorted
  (or heap-selected when more than ``k``);
* dual (``z = (α, β)``): the fused sums of :mod:`optlayers.kernels.sparse_ot_dual_numba`.

Status codes returned per problem follow :class:`optlayers.Status`: 0 converged (violation
``<= tol``, or the stall test where ``k`` binds), 1 iteration limit, 2 non-finite, 3 stagnation.
No host round trips, no PyTorch operations inside the loop.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .sparse_ot_dual_numba import _dual_rows
from .sparse_simplex_numba import (
    HEAP_MAX,
    _sift_down,
    _top_sorted,
    heap_sort_desc,
    insertion_sort_desc,
    sorted_threshold,
)

__all__ = ["sparse_ot_lbfgs_numba"]

_C1 = 1e-4
_C2 = 0.9
_TRIALS = 30


@numba.njit(cache=True)
def _heap_row(z, row, inv, bj, kk, gam, g, hv, hi):  # pragma: no cover - compiled
    """One column of the semi-dual for ``kk <= HEAP_MAX``: the ``kk``-sparse projection of
    ``x = (α − row)/γ`` onto mass ``bj``, added to ``g``; returns ``(Σ t (row + γ t/2), nnz)``.

    One pass keeps the ``kk`` largest candidates (``x ≥`` running max ``− bj``) in a bounded
    min-heap; the entries it misses are below the threshold ``τ ≥ max x − bj``.
    """
    n = row.shape[0]
    mx = -np.inf
    size = 0
    for i in range(n):
        x = (z[i] - row[i]) * inv
        if x > mx:
            mx = x
        if x < mx - bj:
            continue
        if size < kk:
            hv[size] = x
            hi[size] = i
            size += 1
            if size == kk:
                for p in range(kk // 2 - 1, -1, -1):
                    _sift_down(hv, hi, kk, p)
        elif x > hv[0]:
            hv[0] = x
            hi[0] = i
            _sift_down(hv, hi, kk, 0)
    if size < kk:
        insertion_sort_desc(hv, hi, size)
    else:
        heap_sort_desc(hv, hi, kk)
    tau = sorted_threshold(hv, size, bj)
    nnz = 0
    add = 0.0
    for t in range(size):
        v = hv[t] - tau
        if v > 0.0:
            nnz += 1
            i = hi[t]
            g[i] += v
            add += v * (row[i] + 0.5 * gam * v)
    return add, nnz


@numba.njit(cache=True)
def _semi_oracle(z, K, a, bm, gam, kk, g, cv, ci, hv, hi):  # pragma: no cover - compiled
    """``f = −S(α)`` and ``g = ∇f = P1 − a`` (into ``g``); returns ``(f, ‖g‖₁, binding)``."""
    m, n = K.shape
    inv = 1.0 / gam
    for i in range(n):
        g[i] = -a[i]
    tot = 0.0  # Σ t (K + γ t / 2)
    binding = False
    for j in range(m):
        row = K[j]
        bj = bm[j]
        mx = -np.inf
        if kk < n and kk <= HEAP_MAX:
            add, nnz = _heap_row(z, row, inv, bj, kk, gam, g, hv, hi)
            tot += add
            if nnz >= kk:
                binding = True
            continue
        cnt = 0
        for i in range(n):
            x = (z[i] - row[i]) * inv
            if x > mx:
                mx = x
            if x >= mx - bj:
                cv[cnt] = x
                ci[cnt] = i
                cnt += 1
        # keep the true candidates (the running maximum only grew)
        c2 = 0
        lim = mx - bj
        for t in range(cnt):
            if cv[t] >= lim:
                cv[c2] = cv[t]
                ci[c2] = ci[t]
                c2 += 1
        w = c2 if c2 < kk else kk
        if c2 <= 16:
            # c2 is small: quadratic regularization gives small supports
            insertion_sort_desc(cv, ci, c2)
            for t in range(w):
                hv[t] = cv[t]
                hi[t] = ci[t]
        else:
            _top_sorted(cv[:c2], w, hv, hi)
            for t in range(w):
                hi[t] = ci[hi[t]]
        tau = sorted_threshold(hv, w, bj)
        nnz = 0
        for t in range(w):
            v = hv[t] - tau
            if v > 0.0:
                nnz += 1
                i = hi[t]
                g[i] += v
                tot += v * (row[i] + 0.5 * gam * v)
        if kk < n and nnz >= kk:
            binding = True
    viol = 0.0
    zg = 0.0
    for i in range(n):
        viol += abs(g[i])
        zg += z[i] * g[i]
    # S = ⟨α, a − P1⟩ + ⟨P, K⟩ + (γ/2)‖P‖² (no cancellation near the optimum); f = −S
    return zg - tot, viol, binding


@numba.njit(cache=True)
def _dual_oracle(z, K3, a, bm, gam, kk, g, acc, rm):  # pragma: no cover - compiled
    """``f = −D(α, β)`` and its gradient ``(P1 − a, Pᵀ1 − b)`` (into ``g``); ``(f, ‖g‖₁, binding)``."""
    _, m, n = K3.shape
    acc[0, :] = 0.0
    inner, binding = _dual_rows(z[:n].reshape((1, n)), z[n:].reshape((1, m)), K3, kk, 0, 0, m, acc[0], rm)
    inv = 1.0 / gam
    viol = 0.0
    zg = 0.0
    for i in range(n):
        g[i] = acc[0, i] * inv - a[i]
    for j in range(m):
        g[n + j] = rm[0, j] * inv - bm[j]
    for i in range(n + m):
        viol += abs(g[i])
        zg += z[i] * g[i]
    return zg - inner * inv, viol, binding


@numba.njit(cache=True)
def _oracle(semi, z, K3, a, bm, gam, kk, g, cv, ci, hv, hi, acc, rm):  # pragma: no cover - compiled
    if semi:
        return _semi_oracle(z, K3[0], a, bm, gam, kk, g, cv, ci, hv, hi)
    return _dual_oracle(z, K3, a, bm, gam, kk, g, acc, rm)


@numba.njit(cache=True)
def _finite(x):  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        if not math.isfinite(x[i]):
            return False
    return True


@numba.njit(cache=True)
def _dot(x, y):  # pragma: no cover - compiled
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i] * y[i]
    return s


@numba.njit(cache=True)
def _solve_one(semi, z, K3, a, bm, gam, kk, memory, max_iter, tol, ftol, window,
               fscale):  # pragma: no cover - compiled
    """L-BFGS on problem data ``K3 (1, m, n)``; ``z`` updated in place.

    Returns ``(iterations, residual, status)``.
    """
    d = z.shape[0]
    m, n = K3.shape[1], K3.shape[2]
    cv = np.empty(n)
    ci = np.empty(n, dtype=np.int64)
    kw = kk if kk > 1 else 1
    hv = np.empty(max(kw, 1))
    hi = np.empty(max(kw, 1), dtype=np.int64)
    acc = np.zeros((1, n))
    rm = np.zeros((1, m))
    g = np.empty(d)
    f, viol, binding = _oracle(semi, z, K3, a, bm, gam, kk, g, cv, ci, hv, hi, acc, rm)
    if not (math.isfinite(f) and _finite(g) and math.isfinite(viol)):
        return 0, viol, 2
    if viol <= tol:
        return 0, viol, 0
    S = np.zeros((memory, d))
    Y = np.zeros((memory, d))
    R = np.zeros(memory)
    alph = np.zeros(memory)
    head = 0  # slot of the next pair (ring buffer: pairs head, head+1, ... are oldest first)
    hist_f = np.empty(window)
    hist_v = np.empty(window)
    hist_f[0] = f
    hist_v[0] = viol
    hlen = 1
    hpos = 0  # oldest entry once the window is full
    scale_h = 1.0
    has_pair = False
    retry = False
    t_retry = 1.0
    eps = np.finfo(np.float64).eps
    tiny = np.finfo(np.float64).tiny
    q = np.empty(d)
    dirn = np.empty(d)
    zt = np.empty(d)
    gt = np.empty(d)
    za = np.empty(d)
    ga = np.empty(d)
    resid = viol
    solved = False
    it = 0
    status = 1
    while it < max_iter:
        # two-loop recursion (pairs with ρ = 0 are no-ops)
        for i in range(d):
            q[i] = g[i]
        for r in range(memory):
            p = (head - 1 - r) % memory
            if R[p] != 0.0:
                al = R[p] * _dot(S[p], q)
                alph[p] = al
                for i in range(d):
                    q[i] -= al * Y[p, i]
            else:
                alph[p] = 0.0
        for i in range(d):
            q[i] *= scale_h
        for r in range(memory):
            p = (head + r) % memory
            if R[p] != 0.0:
                be = R[p] * _dot(Y[p], q)
                c = alph[p] - be
                for i in range(d):
                    q[i] += c * S[p, i]
        for i in range(d):
            dirn[i] = -q[i]
        slope = _dot(g, dirn)
        gg = _dot(g, g)
        if not (math.isfinite(slope) and slope < 0.0):
            for i in range(d):
                dirn[i] = -g[i]
            slope = -gg
        if retry:
            t = t_retry
        elif has_pair:
            t = 1.0
        else:
            t = min(1.0, 1.0 / max(math.sqrt(gg), tiny))
        # weak-Wolfe line search on the directional derivative (convex f)
        lo = 0.0
        hi_t = np.inf
        ok = False
        fa = f
        va = viol
        ba = binding
        for _ in range(_TRIALS):
            for i in range(d):
                zt[i] = z[i] + t * dirn[i]
            ft, vt, bt = _oracle(semi, zt, K3, a, bm, gam, kk, gt, cv, ci, hv, hi, acc, rm)
            dphi = _dot(gt, dirn)
            fin = math.isfinite(ft) and math.isfinite(dphi)
            armijo = fin and (dphi <= _C1 * slope or ft <= f + _C1 * t * slope)
            good = armijo and dphi >= _C2 * slope
            if armijo:
                ok = True
                for i in range(d):
                    za[i] = zt[i]
                    ga[i] = gt[i]
                fa = ft
                va = vt
                ba = bt
            if good:
                break
            if armijo:
                lo = t
            else:
                hi_t = t
            t = 2.0 * t if hi_t == np.inf else 0.5 * (lo + hi_t)
        exhausted = not ok
        slv = exhausted and binding
        if hlen >= window:
            # oldest entry of the window: position hpos (ring buffer of length window, full)
            f_ref = hist_f[hpos]
            v_ref = hist_v[hpos]
            gain = f_ref - fa
            if ba and ok and gain <= ftol * max(abs(fa), fscale) and va > 0.5 * v_ref:
                slv = True
        it += 1
        nonfin = ok and not (_finite(za) and math.isfinite(fa) and math.isfinite(va))
        stall = exhausted and not has_pair and not binding
        if nonfin:
            status = 2
            break
        if stall:
            status = 3
            break
        if ok:
            resid = va
            solved = slv
        else:
            solved = slv
        done = resid <= tol or solved
        reset = (not done) and exhausted and has_pair
        retry = (not ok) and not reset
        t_retry = t
        valid = False
        if ok:
            sy = 0.0
            yy = 0.0
            ss = 0.0
            for i in range(d):
                si = za[i] - z[i]
                yi = ga[i] - g[i]
                sy += si * yi
                yy += yi * yi
                ss += si * si
            valid = sy > eps * math.sqrt(ss) * math.sqrt(yy) and yy > 0.0
        if reset:
            for p in range(memory):
                R[p] = 0.0
        if valid:
            for i in range(d):
                S[head, i] = za[i] - z[i]
                Y[head, i] = ga[i] - g[i]
            R[head] = 1.0 / sy
            scale_h = sy / yy
        else:
            S[head, :] = 0.0
            Y[head, :] = 0.0
            R[head] = 0.0
        head = (head + 1) % memory
        if reset:
            scale_h = 1.0
        has_pair = (has_pair or valid) and not reset
        if ok:
            for i in range(d):
                z[i] = za[i]
                g[i] = ga[i]
            f = fa
            viol = va
            binding = ba
        if hlen < window:
            hist_f[hlen] = f
            hist_v[hlen] = viol
            hlen += 1
        else:
            hist_f[hpos] = f
            hist_v[hpos] = viol
            hpos = (hpos + 1) % window
        if done:
            status = 0
            break
    return it, resid, status


@numba.njit(cache=True)
def _solve_all(semi, Z, K, A, Bm, gam, kk, memory, max_iter, tol, ftol, window, fscale, iters, resid,
               status):  # pragma: no cover - compiled
    for b in range(K.shape[0]):
        it, r, s = _solve_one(semi, Z[b], K[b:b + 1], A[b], Bm[b], gam[b], kk, memory, max_iter, tol, ftol,
                              window, fscale[b])
        iters[b] = it
        resid[b] = r
        status[b] = s


def sparse_ot_lbfgs_numba(z0: torch.Tensor, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          gamma: torch.Tensor, kk: int, *, semi: bool, memory: int, max_iter: int, tol: float,
                          ftol: float, window: int, fscale: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every problem of the batch by L-BFGS (see the module docstring).

    Args:
        z0: ``(B, n)`` (semi-dual) or ``(B, n + m)`` (dual) starting potentials.
        K: ``(B, m, n)`` cost, constrained lines as rows (finite).
        a, b: ``(B, n)``, ``(B, m)`` masses. gamma, fscale: ``(B,)``.

    Returns:
        ``(z, iterations, residual, status)`` with ``z`` in the dtype of ``z0``.
    """
    f64 = np.float64
    Kn = np.ascontiguousarray(K.detach().cpu().numpy(), dtype=f64)
    Z = np.array(z0.detach().cpu().numpy(), dtype=f64, order="C", copy=True)
    An = np.ascontiguousarray(a.detach().cpu().numpy(), dtype=f64)
    Bn = np.ascontiguousarray(b.detach().cpu().numpy(), dtype=f64)
    Gn = np.ascontiguousarray(gamma.detach().cpu().numpy(), dtype=f64)
    Fs = np.ascontiguousarray(fscale.detach().cpu().numpy(), dtype=f64)
    B = Kn.shape[0]
    iters = np.zeros(B, dtype=np.int64)
    resid = np.zeros(B, dtype=f64)
    status = np.zeros(B, dtype=np.int64)
    if B:
        _solve_all(bool(semi), Z, Kn, An, Bn, Gn, int(kk), int(memory), int(max_iter), float(tol), float(ftol),
                   int(window), Fs, iters, resid, status)
    return (torch.from_numpy(Z).to(z0.dtype), torch.from_numpy(iters), torch.from_numpy(resid).to(z0.dtype),
            torch.from_numpy(status))

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
  (:mod:`optlayers.solvers.dro.spectral`);
* the 1-D root-finds ``kl_ball_root_numba``, ``cr_ball_root_numba``, ``cr_penalty_root_numba``
  and ``holistic_root_numba`` — the safeguarded Newton–bisection of
  :func:`optlayers.solvers.dro._common.newton_bisect`, one row at a time in scalar code with the
  function and derivative evaluated in one fused pass (references: ``*_root_reference`` in
  :mod:`optlayers.solvers.dro.kl`, ``.cressie_read`` and ``.holistic``). At the batch sizes of a
  training step the reference is dominated by the per-op overhead of ~60 small tensor ops per
  iteration and one host synchronisation; here the whole search is one call.

Sorting is done by NumPy outside the compiled loops: its SIMD sort is an order of magnitude
faster than Numba's (and than ``torch.sort`` on CPU).

Inputs are ``(B, n)`` float64 CPU tensors; rows are independent.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch

__all__ = ["cvar_numba", "chi2_ball_numba", "perm_proj_l2_numba", "perm_proj_kl_numba", "kl_ball_root_numba",
           "cr_ball_root_numba", "cr_penalty_root_numba", "holistic_root_numba", "fused_kl_ball_row",
           "fused_cr_ball_row", "fused_cr_penalty_row", "fused_holistic_row", "fused_kl_penalty_row",
           "fused_chi2_penalty_row", "fused_cvar_row", "fused_chi2_ball_row", "fused_spectral_row",
           "fused_rows", "CLOSED_KINDS", "ROOT_KINDS", "fused_closed_batch", "fused_root_batch", "desc_order_f32",
           "log_weights"]


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


# ---------------------------------------------------------------------------------------------
# 1-D root-finds (safeguarded Newton-bisection, scalar transcription of ``newton_bisect``)
# ---------------------------------------------------------------------------------------------

_KL_BALL, _CR_BALL, _CR_PEN, _HOLISTIC = 0, 1, 2, 3


@numba.njit(cache=True, error_model="numpy")
def _powb(t, beta):  # pragma: no cover - compiled
    """``t ** beta`` for ``t > 0`` with the common exponents done without ``pow``."""
    if beta == 0.5:
        return math.sqrt(t)
    if beta == 1.0:
        return t
    if beta == 2.0:
        return t * t
    return t ** beta


@numba.njit(cache=True, error_model="numpy")
def _cr_f(t, k):  # pragma: no cover - compiled
    """Scalar ``cressie_read_f`` (same branches as the PyTorch version)."""
    h = t - 1.0
    if abs(h) < 0.01:
        coef = k * (k - 1.0) / 2.0
        hp = h * h
        series = coef * hp
        for j in range(3, 11):
            coef = coef * (k - j + 1.0) / j
            hp = hp * h
            series = series + coef * hp
        return series / (k * (k - 1.0))
    pw = math.expm1(k * math.log1p(h)) if h > -1.0 else -1.0
    return (pw - k * h) / (k * (k - 1.0))


@numba.njit(cache=True, error_model="numpy")
def _eval(kind, a, q, prm, x):  # pragma: no cover - compiled
    """``(f(x), f'(x))`` of one row for the root-find ``kind`` (see the PyTorch references)."""
    n = a.shape[0]
    if kind == _KL_BALL:  # prm = (log rho, mean Z)
        logrho, zbar = prm[0], prm[1]
        c = math.exp(-x)
        shift = c * zbar if c * abs(zbar) <= 30.0 else 0.0
        ss = 0.0
        sem = 0.0
        sems = 0.0
        sss = 0.0
        semss = 0.0
        for i in range(n):
            s = a[i] * c - shift
            em = math.expm1(s)
            ss += s
            sem += em
            ems = em * s
            sems += ems
            sss += s * s
            semss += ems * s
        A = sem / n
        S0 = n * (1.0 + A)
        m1 = (ss + sems) / S0
        kl = max(m1 - math.log1p(A), 0.0)
        var = max((sss + semss) / S0 - m1 * m1, 0.0)
        return logrho - np.log(kl), var / kl
    if kind == _CR_BALL:  # prm = (log rho, beta, k, k(k-1), (k-1) log n, accurate)
        logrho, beta, k, kk, logscale, accurate = prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]
        c = math.exp(-x)
        s_m = 0.0
        s_0 = 0.0
        s_1 = 0.0
        for i in range(n):
            t = 1.0 + a[i] * c
            if t > 0.0:
                tb = _powb(t, beta)
                s_m += tb / t
                s_0 += tb
                s_1 += tb * t
        logr = np.log(s_1) - k * np.log(s_0)
        scaled_r = math.exp(logscale + logr)
        dlogr = (beta + 1.0) * (s_0 / s_1 - s_m / s_0)
        if accurate > 0.0:
            D = 0.0
            for i in range(n):
                t = 1.0 + a[i] * c
                tb = _powb(t, beta) if t > 0.0 else 0.0
                D += _cr_f(n * (tb / s_0), k)
            D = D / n
        else:
            D = (scaled_r - 1.0) / kk
        return logrho - np.log(D), -scaled_r * dlogr / (kk * D)
    if kind == _CR_PEN:  # prm = (log T, beta)
        logT, beta = prm[0], prm[1]
        m = max(-x, 1e-300)
        c = 1.0 / m
        s_m = 0.0
        s_0 = 0.0
        for i in range(n):
            t = 1.0 + a[i] * c
            if t > 0.0:
                tb = _powb(t, beta)
                s_m += tb / t
                s_0 += tb
        return logT - beta * np.log(m) - np.log(s_0), beta * s_m / (m * s_0)
    # holistic: a = delta, q = poisoned weights, prm = (r, alpha)
    r, alpha = prm[0], prm[1]
    e = math.exp(-x)
    G1 = 0.0
    h = alpha
    k2 = alpha
    for i in range(n):
        y = a[i] * e
        w = 1.0 / (y + 1.0)
        qw = q[i] * w
        G1 += q[i] * math.log(y + 1.0)
        h += qw
        k2 += qw * w
    return r - G1 - np.log(h), (k2 - h * h) / h


@numba.njit(cache=True, error_model="numpy")
def _newton_bisect_row(kind, a, q, prm, lo, hi, x0, tol, max_iter, feas, xtol, active, jump, xmin,
                       xmax):  # pragma: no cover - compiled
    """One row of ``newton_bisect`` (``feas``: 1 = "hi", -1 = "lo", 0 = None)."""
    inf = np.inf
    if x0 > lo and x0 < hi:
        x = x0
    elif math.isfinite(lo) and math.isfinite(hi):
        x = 0.5 * (lo + hi)
    elif math.isfinite(lo):
        x = lo + jump
    else:
        x = hi - jump
    if not math.isfinite(x):
        x = 0.0
    x = min(max(x, xmin), xmax)
    done = not active
    iters = 0
    res = 0.0
    cap = jump
    width_prev = abs(hi - lo)
    target = 0.5 * tol if feas == 1 else (-0.5 * tol if feas == -1 else 0.0)
    for _ in range(max_iter):
        if done:
            break
        f, df = _eval(kind, a, q, prm, x)
        res = abs(f)
        iters += 1
        if f <= 0.0:
            lo = x
        if f >= 0.0:
            hi = x
        width = hi - lo
        if feas == 1:
            wrong = f < 0.0
        elif feas == -1:
            wrong = f > 0.0
        else:
            wrong = False
        edge = False
        if feas != -1:
            edge = edge or (x <= xmin and f > 0.0)
        if feas != 1:
            edge = edge or (x >= xmax and f < 0.0)
        done = (abs(f) <= tol and not wrong) or (width <= xtol * (1.0 + abs(x))) or edge
        delta = (f - target) / df
        step = x - (1.001 * delta if wrong else delta)
        finite = math.isfinite(lo) and math.isfinite(hi)
        if width_prev == inf and finite:
            width_prev = 2.0 * width
        bad = (not math.isfinite(step)) or df <= 0.0 or step <= lo or step >= hi or width > 0.5 * width_prev
        if bad:
            width_prev = width
        nxt = 0.5 * (lo + hi) if bad else step
        ok = math.isfinite(step) and df > 0.0 and step > lo and step < hi
        capped = (not ok) or abs(step - x) > cap
        if not finite:
            nxt = (x + cap if f < 0.0 else x - cap) if capped else step
            if capped:
                cap = 2.0 * cap
        nxt = min(max(nxt, xmin), xmax)
        if not done:
            x = nxt
    if not done:
        f, _ = _eval(kind, a, q, prm, x)
        res = abs(f)
        if f <= 0.0:
            lo = x
        if f >= 0.0:
            hi = x
        ok = abs(f) <= tol
        if feas == 1:
            ok = ok and f >= 0.0
        elif feas == -1:
            ok = ok and f <= 0.0
        done = ok
    return x, lo, hi, res, done, iters


@numba.njit(cache=True, error_model="numpy")
def _newton_bisect_rows(kind, A, Q, P, lo, hi, x0, tol, max_iter, feas, xtol, active, jump, xmin, xmax,
                        x_out, lo_out, hi_out, res_out, conv_out, it_out):  # pragma: no cover - compiled
    for b in range(A.shape[0]):
        x, l, h, r, d, it = _newton_bisect_row(kind, A[b], Q[b], P[b], lo[b], hi[b], x0[b], tol, max_iter, feas,
                                               xtol, active[b], jump, xmin, xmax)
        x_out[b] = x
        lo_out[b] = l
        hi_out[b] = h
        res_out[b] = r
        conv_out[b] = d
        it_out[b] = it


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().to(torch.float64).numpy())


def _root(kind: int, A: torch.Tensor, Q: torch.Tensor | None, P: np.ndarray, lo: torch.Tensor,
          hi: torch.Tensor, x0: torch.Tensor, active: torch.Tensor | None, *, tol: float, max_iter: int,
          feasible: str | None, xmin: float = -math.inf,
          xmax: float = math.inf) -> tuple[torch.Tensor, ...]:
    a = _np(A)
    B = a.shape[0]
    qa = a if Q is None else _np(Q)
    act = np.ones(B, dtype=np.bool_) if active is None else np.ascontiguousarray(active.cpu().numpy())
    feas = 1 if feasible == "hi" else (-1 if feasible == "lo" else 0)
    outs = [np.empty(B) for _ in range(4)]
    conv = np.empty(B, dtype=np.bool_)
    its = np.empty(B, dtype=np.int64)
    _newton_bisect_rows(kind, a, qa, np.ascontiguousarray(P, dtype=np.float64), _np(lo), _np(hi), _np(x0),
                        float(tol), int(max_iter), feas, 4e-16, act, 1.0, float(xmin), float(xmax),
                        outs[0], outs[1], outs[2], outs[3], conv, its)
    return (*(torch.from_numpy(o) for o in outs), torch.from_numpy(conv), torch.from_numpy(its))


def kl_ball_root_numba(Z: torch.Tensor, logrho: float, x0: torch.Tensor, hi: torch.Tensor, active: torch.Tensor,
                       *, tol: float, max_iter: int) -> tuple[torch.Tensor, ...]:
    """KL-ball multiplier search (Numba); see ``optlayers.solvers.dro.kl.kl_ball_root_reference``."""
    B = Z.shape[0]
    P = np.empty((B, 2))
    P[:, 0] = logrho
    P[:, 1] = _np(Z.mean(1))
    lo = torch.full((B,), -math.inf, dtype=torch.float64)
    _, lo, hi, res, conv, its = _root(_KL_BALL, Z, None, P, lo, hi, x0, active, tol=tol, max_iter=max_iter,
                                      feasible="hi", xmin=-700.0)
    return lo, hi, res, conv, its


def cr_ball_root_numba(Z: torch.Tensor, rho: float, k: float, u0: torch.Tensor, active: torch.Tensor, *,
                       tol: float, max_iter: int) -> tuple[torch.Tensor, ...]:
    """Cressie–Read ball search (Numba); see
    ``optlayers.solvers.dro.cressie_read.cr_ball_root_reference``."""
    B, n = Z.shape
    kk = k * (k - 1.0)
    P = np.empty((B, 6))
    P[:] = (math.log(rho), 1.0 / (k - 1.0), k, kk, (k - 1.0) * math.log(n), 1.0 if kk * rho < 1e-3 else 0.0)
    inf = torch.full((B,), math.inf, dtype=torch.float64)
    _, lo, hi, res, conv, its = _root(_CR_BALL, Z, None, P, -inf, inf, u0, active, tol=tol, max_iter=max_iter,
                                      feasible="hi", xmin=-700.0, xmax=700.0)
    return lo, hi, res, conv, its


def cr_penalty_root_numba(Z: torch.Tensor, logT: torch.Tensor, beta: float, lo: torch.Tensor, hi: torch.Tensor,
                          *, tol: float, max_iter: int) -> tuple[torch.Tensor, ...]:
    """Cressie–Read penalty threshold search (Numba); see
    ``optlayers.solvers.dro.cressie_read.cr_penalty_root_reference``."""
    B = Z.shape[0]
    P = np.empty((B, 2))
    P[:, 0] = _np(logT.expand(B))
    P[:, 1] = beta
    return _root(_CR_PEN, Z, None, P, lo, hi, 0.5 * (lo + hi), None, tol=tol, max_iter=max_iter, feasible=None)


def holistic_root_numba(delta: torch.Tensor, q: torch.Tensor, alpha: float, r: float, u0: torch.Tensor,
                        active: torch.Tensor, *, tol: float, max_iter: int) -> tuple[torch.Tensor, ...]:
    """Holistic-robustness search (Numba); see ``optlayers.solvers.dro.holistic.holistic_root_reference``."""
    B = delta.shape[0]
    P = np.empty((B, 2))
    P[:] = (r, alpha)
    inf = torch.full((B,), math.inf, dtype=torch.float64)
    _, lo, hi, res, conv, its = _root(_HOLISTIC, delta, q, P, -inf, inf, u0, active, tol=tol, max_iter=max_iter,
                                      feasible="hi", xmin=-700.0, xmax=700.0)
    return lo, hi, res, conv, its


# ---------------------------------------------------------------------------------------------
# Fused one-row solvers: the whole inner problem of one spec in one compiled call (used by the
# training fast path ``optlayers.solvers.dro.fused``). Each takes one float64 row ``l``, writes
# the weights into ``p`` and returns ``(value, x, converged)``: the robust value
# ``<p, l> - penalty`` and the root-find variable ``x`` (NaN for closed forms), which a caller
# may pass back as ``warm`` on the next, similar row (a warm start: the search then begins at
# the previous root, and the tolerance test at the end is the same). They transcribe the
# PyTorch solvers of :mod:`optlayers.solvers.dro` step by step.
# ---------------------------------------------------------------------------------------------


@numba.njit(cache=True, error_model="numpy")
def _max_min_top(l):  # pragma: no cover - compiled
    n = l.shape[0]
    lmax = l[0]
    lmin = l[0]
    for i in range(1, n):
        v = l[i]
        if v > lmax:
            lmax = v
        if v < lmin:
            lmin = v
    n_top = 0
    for i in range(n):
        if l[i] == lmax:
            n_top += 1
    return lmax, lmin, n_top


@numba.njit(cache=True, error_model="numpy")
def _argmax_row(l, lmax, n_top, p, scale, add):  # pragma: no cover - compiled
    """``p = add * p + scale * argmax_uniform(l)`` (``add`` 0 or 1)."""
    w = scale / n_top
    for i in range(l.shape[0]):
        base = p[i] if add else 0.0
        p[i] = base + (w if l[i] == lmax else 0.0)


@numba.njit(cache=True, error_model="numpy")
def _dot(a, b):  # pragma: no cover - compiled
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@numba.njit(cache=True, error_model="numpy")
def _scaled_z(l, lmax, R):  # pragma: no cover - compiled
    """``Z = (l - max) / R`` and its mean and (population) variance."""
    n = l.shape[0]
    Z = np.empty(n)
    zs = 0.0
    for i in range(n):
        z = (l[i] - lmax) / R
        Z[i] = z
        zs += z
    zbar = zs / n
    v = 0.0
    for i in range(n):
        d = Z[i] - zbar
        v += d * d
    return Z, zbar, v / n


@numba.njit(cache=True, error_model="numpy")
def fused_kl_ball_row(l, rho, tol, max_iter, warm, p):  # pragma: no cover - compiled
    """KL ball (``solve_kl_ball``)."""
    n = l.shape[0]
    lmax, lmin, n_top = _max_min_top(l)
    if rho <= 0.0:
        for i in range(n):
            p[i] = 1.0 / n
        return _dot(p, l), np.nan, True
    if rho >= math.log(n / n_top):
        _argmax_row(l, lmax, n_top, p, 1.0, False)
        return lmax, np.nan, True
    Z, zbar, var_u = _scaled_z(l, lmax, lmax - lmin)
    logrho = math.log(rho)
    hi = -logrho
    x0 = 0.5 * np.log(var_u / (2.0 * rho))
    x0 = min(x0, hi) if math.isfinite(x0) else hi - 1.0
    if math.isfinite(warm) and warm < hi:
        x0 = warm
    prm = np.empty(2)
    prm[0] = logrho
    prm[1] = zbar
    _, _, hi, _, done, _ = _newton_bisect_row(_KL_BALL, Z, Z, prm, -np.inf, hi, x0, tol, max_iter, 1, 4e-16, True,
                                              1.0, -700.0, np.inf)
    c = math.exp(-hi)
    shift = c * zbar if c * abs(zbar) <= 30.0 else 0.0
    A = 0.0
    for i in range(n):
        em = math.expm1(Z[i] * c - shift)
        p[i] = em
        A += em
    S0 = n * (1.0 + A / n)
    for i in range(n):
        p[i] = (p[i] + 1.0) / S0
    return _dot(p, l), hi, done


@numba.njit(cache=True, error_model="numpy")
def _cr_weights(Z, c, beta, p):  # pragma: no cover - compiled
    """``p = t^beta / sum(t^beta)`` with ``t = (1 + c Z)_+``."""
    s0 = 0.0
    for i in range(Z.shape[0]):
        t = 1.0 + Z[i] * c
        tb = _powb(t, beta) if t > 0.0 else 0.0
        p[i] = tb
        s0 += tb
    for i in range(Z.shape[0]):
        p[i] /= s0


@numba.njit(cache=True, error_model="numpy")
def fused_cr_ball_row(l, k, rho, tol, max_iter, warm, p):  # pragma: no cover - compiled
    """Cressie–Read ball, ``k != 2`` (``solve_cressie_read`` with ``rho``)."""
    n = l.shape[0]
    lmax, lmin, n_top = _max_min_top(l)
    if rho <= 0.0:
        for i in range(n):
            p[i] = 1.0 / n
        return _dot(p, l), np.nan, True
    beta = 1.0 / (k - 1.0)
    kk = k * (k - 1.0)
    R = lmax - lmin
    dmax = (n_top * _cr_f(n / n_top, k) + (n - n_top) / k) / n
    if R <= 0.0 or rho >= dmax:
        _argmax_row(l, lmax, n_top, p, 1.0, False)
        return lmax, np.nan, True
    Z, _, var = _scaled_z(l, lmax, R)
    u0 = 0.5 * np.log(beta * beta * var / (2.0 * rho))
    if not math.isfinite(u0):
        u0 = 0.0
    x0 = warm if math.isfinite(warm) else u0
    prm = np.empty(6)
    prm[0] = math.log(rho)
    prm[1] = beta
    prm[2] = k
    prm[3] = kk
    prm[4] = (k - 1.0) * math.log(n)
    prm[5] = 1.0 if kk * rho < 1e-3 else 0.0
    _, _, hi, _, done, _ = _newton_bisect_row(_CR_BALL, Z, Z, prm, -np.inf, np.inf, x0, tol, max_iter, 1, 4e-16,
                                              True, 1.0, -700.0, 700.0)
    u = hi if math.isfinite(hi) else u0
    _cr_weights(Z, math.exp(-u), beta, p)
    return _dot(p, l), hi, done


@numba.njit(cache=True, error_model="numpy")
def fused_cr_penalty_row(l, k, lam, tol, max_iter, warm, p):  # pragma: no cover - compiled
    """Cressie–Read penalty, ``k != 2`` (``solve_cressie_read`` with ``lam``)."""
    n = l.shape[0]
    lmax, lmin, _ = _max_min_top(l)
    beta = 1.0 / (k - 1.0)
    R = lmax - lmin
    Rs = R if R > 0.0 else 1.0
    Z, _, _ = _scaled_z(l, lmax, Rs)
    lam_s = lam / Rs
    zmin = 0.0
    for i in range(n):
        zmin = min(zmin, Z[i])
    lo = zmin - lam_s / (k - 1.0)
    hi = 0.0
    x0 = warm if (math.isfinite(warm) and warm > lo and warm < hi) else 0.5 * (lo + hi)
    prm = np.empty(2)
    prm[0] = math.log(n) + beta * math.log(lam_s / (k - 1.0))
    prm[1] = beta
    x, _, _, _, done, _ = _newton_bisect_row(_CR_PEN, Z, Z, prm, lo, hi, x0, tol, max_iter, 0, 4e-16, True, 1.0,
                                             -np.inf, np.inf)
    c = 1.0 / max(-x, 1e-300)
    s0 = 0.0
    s1 = 0.0
    for i in range(n):
        t = 1.0 + Z[i] * c
        tb = _powb(t, beta) if t > 0.0 else 0.0
        p[i] = tb
        s0 += tb
        s1 += tb * t
    for i in range(n):
        p[i] /= s0
    # D_k(p) = (n^{k-1} sum_i p_i^k - 1) / (k(k-1)) and p_i^k = t_i^{beta+1} / s0^k; the closed
    # form cancels for small divergences, where the terms are summed one by one instead
    kk = k * (k - 1.0)
    D = (math.exp((k - 1.0) * math.log(n) + math.log(s1) - k * math.log(s0)) - 1.0) / kk
    if not (kk * D >= 1e-3):
        D = 0.0
        for i in range(n):
            D += _cr_f(n * p[i], k)
        D /= n
    return _dot(p, l) - lam * D, x, done


@numba.njit(cache=True, error_model="numpy")
def fused_holistic_row(l, alpha, r, tol, max_iter, warm, p):  # pragma: no cover - compiled
    """Holistic robustness (``solve_holistic``; ``p`` must not alias ``l``)."""
    n = l.shape[0]
    lmax, lmin, n_top = _max_min_top(l)
    # poisoned weights q (holistic_poisoned_weights), stored in p for now
    m = alpha * n
    if m <= 0.0:
        for i in range(n):
            p[i] = 1.0 / n
    elif m >= n:
        for i in range(n):
            p[i] = 0.0
    else:
        j = min(max(math.ceil(m), 1), n)
        tau = _select_desc(l.copy(), n - j + 1)  # the j-th smallest
        n_below = 0
        n_eq = 0
        for i in range(n):
            if l[i] < tau:
                n_below += 1
            elif l[i] == tau:
                n_eq += 1
        share = min(max(m - n_below, 0.0), n_eq) / (n * n_eq)
        for i in range(n):
            if l[i] < tau:
                p[i] = 0.0
            elif l[i] == tau:
                p[i] = max(1.0 / n - share, 0.0)
            else:
                p[i] = 1.0 / n
    if r <= 0.0:
        _argmax_row(l, lmax, n_top, p, alpha, True)
        return _dot(p, l), np.nan, True
    spread = np.inf
    for i in range(n):
        if p[i] > 0.0 and l[i] < spread:
            spread = l[i]
    if lmax - spread <= 0.0:
        _argmax_row(l, lmax, n_top, p, alpha, True)
        return _dot(p, l), np.nan, True
    R = lmax - lmin
    q = p.copy()
    delta = np.empty(n)
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        d = (lmax - l[i]) / R
        delta[i] = d
        s1 += q[i] * d
        s2 += q[i] * d * d
    u0 = 0.5 * np.log(max((s2 - s1 * s1) / (2.0 * r), 1e-300))
    x0 = warm if math.isfinite(warm) else u0
    prm = np.empty(2)
    prm[0] = r
    prm[1] = alpha
    _, _, hi, _, done, _ = _newton_bisect_row(_HOLISTIC, delta, q, prm, -np.inf, np.inf, x0, tol, max_iter, 1,
                                              4e-16, True, 1.0, -700.0, 700.0)
    u = hi if math.isfinite(hi) else u0
    e = math.exp(-u)
    h = alpha
    for i in range(n):
        qw = q[i] / (delta[i] * e + 1.0)
        p[i] = qw
        h += qw
    for i in range(n):
        p[i] /= h
    _argmax_row(l, lmax, n_top, p, alpha / h, True)
    return _dot(p, l), hi, done


@numba.njit(cache=True, error_model="numpy")
def fused_kl_penalty_row(l, lam, sign, p):  # pragma: no cover - compiled
    """KL penalty (``solve_kl_penalty``; ``sign = -1`` the optimistic variant)."""
    n = l.shape[0]
    zmax = -np.inf
    for i in range(n):
        zmax = max(zmax, sign * l[i] / lam)
    se = 0.0
    for i in range(n):
        e = math.exp(sign * l[i] / lam - zmax)
        p[i] = e
        se += e
    # KL(p || u) = sum_i p_i log(n p_i) with log p_i = z_i - zmax - log(se): no log per entry
    ez = 0.0
    for i in range(n):
        pi = p[i] / se
        p[i] = pi
        ez += pi * (sign * l[i] / lam)
    kl = max(ez - zmax - math.log(se) + math.log(n), 0.0)
    return _dot(p, l) - sign * lam * kl, np.nan, True


@numba.njit(cache=True, error_model="numpy")
def fused_chi2_penalty_row(l, s, lam, p):  # pragma: no cover - compiled
    """Chi-square penalty (``solve_chi2_penalty``); ``s`` is ``l`` sorted in descending order."""
    n = l.shape[0]
    c = 1.0 / (2.0 * lam * n)
    cs = 0.0
    eta = s[0] - 1.0 / c
    for j in range(n):
        cs += s[j]
        e = (cs - 1.0 / c) / (j + 1)
        if s[j] > e:
            eta = e
    tot = 0.0
    for i in range(n):
        v = c * (l[i] - eta)
        v = v if v > 0.0 else 0.0
        p[i] = v
        tot += v
    div = 0.0
    for i in range(n):
        p[i] /= tot
        d = n * p[i] - 1.0
        div += d * d
    return _dot(p, l) - lam * (div / n), np.nan, True



@numba.njit(cache=True, error_model="numpy")
def fused_cvar_row(l, alpha, k, eps, p):  # pragma: no cover - compiled
    """CVaR(alpha) (``eps = 0``) or the TV ball ``(1-eps) CVaR_{1-eps} + eps max`` (``alpha = 1-eps``)."""
    n = l.shape[0]
    _cvar_rows(l.reshape(1, n), alpha, k, p.reshape(1, n), np.empty(1))
    if eps > 0.0:
        lmax, _, n_top = _max_min_top(l)
        for i in range(n):
            p[i] *= 1.0 - eps
        _argmax_row(l, lmax, n_top, p, eps, True)
    return _dot(p, l), np.nan, True


@numba.njit(cache=True, error_model="numpy")
def fused_chi2_ball_row(l, s, rho, p):  # pragma: no cover - compiled
    """Chi-square ball, ``rho > 0`` (``chi2_ball_reference``); ``s`` is ``l`` sorted descending."""
    n = l.shape[0]
    _chi2_rows(l.reshape(1, n), s.reshape(1, n), rho, p.reshape(1, n), np.empty(1), np.empty(1))
    return _dot(p, l), np.nan, True


@numba.njit(cache=True, error_model="numpy")
def fused_spectral_row(l, order, w, lam, kl, p):  # pragma: no cover - compiled
    """Spectral risk with a chi-square (``kl = False``) or KL penalty ``lam > 0`` (``solve_spectral``);
    ``order`` sorts ``l`` in descending order, ``w`` is the spectrum in descending order."""
    n = l.shape[0]
    scale = 1.0 / lam if kl else 1.0 / (2.0 * lam * n)
    z = np.empty((1, n))
    for i in range(n):
        z[0, i] = l[i] * scale
    if kl:
        _perm_kl_rows(z, order.reshape(1, n), w, p.reshape(1, n))
        div = 0.0
        for i in range(n):
            if p[i] > 0.0:
                div += p[i] * math.log(p[i] * n)
    else:
        _perm_l2_rows(z, order.reshape(1, n), w, p.reshape(1, n))
        div = 0.0
        for i in range(n):
            d = n * p[i] - 1.0
            div += d * d
        div /= n
    return _dot(p, l) - lam * div, np.nan, True

_ROW_FNS = {"kl_ball": fused_kl_ball_row, "cr_ball": fused_cr_ball_row, "cr_penalty": fused_cr_penalty_row,
            "holistic": fused_holistic_row}


def fused_rows(kind: str, a: np.ndarray, prm: tuple[Any, ...], tol: float, max_iter: int,
               warm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run a fused row solver on every row of the C-contiguous float64 ``(B, n)`` array ``a``.

    ``kind`` is ``"kl_ball"``, ``"cr_ball"``, ``"cr_penalty"``, ``"holistic"`` (root-finds, with
    ``prm`` their spec parameters and ``warm`` an optional ``(B,)`` array of previous roots, NaN
    for none), or a closed form: ``"kl_penalty"`` (``prm = (lam, sign)``), ``"chi2_penalty"``
    (``(lam,)``), ``"chi2_ball"`` (``(rho,)``, ``rho > 0``), ``"cvar"`` (``(alpha, k, eps)``:
    CVaR, or the TV ball with ``eps > 0``) or ``"spectral"`` (``(w, lam, kl)``, ``lam > 0``).
    Returns ``(p, value, x, converged)``.
    """
    B, n = a.shape
    p = np.empty_like(a)
    val = np.empty(B)
    xs = np.full(B, np.nan)
    conv = np.ones(B, dtype=np.bool_)
    if kind == "kl_penalty":
        for b in range(B):
            val[b], _, _ = fused_kl_penalty_row(a[b], prm[0], prm[1], p[b])
        return p, val, xs, conv
    if kind == "cvar":  # prm = (alpha, k, eps)
        for b in range(B):
            val[b], _, _ = fused_cvar_row(a[b], prm[0], int(prm[1]), prm[2], p[b])
        return p, val, xs, conv
    if kind in ("chi2_penalty", "chi2_ball"):  # prm = (lam,) or (rho,)
        S = -np.sort(-a, axis=1)
        row = fused_chi2_penalty_row if kind == "chi2_penalty" else fused_chi2_ball_row
        for b in range(B):
            val[b], _, _ = row(a[b], S[b], prm[0], p[b])
        return p, val, xs, conv
    if kind == "spectral":  # prm = (w, lam, kl)
        spectrum = np.ascontiguousarray(prm[0], dtype=np.float64)
        for b in range(B):
            order = np.argsort(-a[b])
            val[b], _, _ = fused_spectral_row(a[b], order, spectrum, float(prm[1]), bool(prm[2]), p[b])
        return p, val, xs, conv
    fn: Any = _ROW_FNS[kind]
    for b in range(B):
        x0 = np.nan if warm is None else float(warm[b])
        val[b], xs[b], conv[b] = fn(a[b], *prm, tol, max_iter, x0, p[b])
    return p, val, xs, conv


# ---------------------------------------------------------------------------------------------
# Whole-batch drivers of the fused row solvers for the training fast path: the losses are read in
# their own dtype (float32 or float64, one compiled specialisation each) into a float64 row, the
# row solver runs in float64 exactly as in ``fused_rows``, and the weights and values are written
# back in the output arrays' dtype. One compiled call per batch: no dtype round trip, no Python
# loop over rows.
# ---------------------------------------------------------------------------------------------

#: ``which`` codes of :func:`fused_closed_batch` and :func:`fused_root_batch`
CLOSED_KINDS = {"cvar": 0, "kl_penalty": 1, "chi2_penalty": 2, "chi2_ball": 3, "spectral": 4}
ROOT_KINDS = {"kl_ball": 0, "cr_ball": 1, "cr_penalty": 2, "holistic": 3}


@numba.njit(cache=True, error_model="numpy")
def _load_row(A, b, l):  # pragma: no cover - compiled
    """``l = float64(A[b])``; False if an entry is not finite."""
    ok = True
    for i in range(l.shape[0]):
        v = np.float64(A[b, i])
        l[i] = v
        if not math.isfinite(v):
            ok = False
    return ok


@numba.njit(cache=True, error_model="numpy")
def _store_row(p, P, V, b, val):  # pragma: no cover - compiled
    for i in range(p.shape[0]):
        P[b, i] = p[i]
    V[b] = val


@numba.njit(cache=True, error_model="numpy")
def fused_closed_batch(which, A, S, order, w, logw, p1, p2, p3, P, V):  # pragma: no cover - compiled
    """Closed-form fused solvers on every row of ``A`` (``(B, n)``, float32 or float64).

    ``which``: :data:`CLOSED_KINDS`; ``S``: ``A`` sorted ascending along rows (chi-square kinds);
    ``order``: per row, the indices sorting it in descending order, and ``w`` the spectrum in
    descending order, ``logw`` its log (:func:`log_weights`; spectral with KL penalty);
    ``p1, p2, p3``: the parameters of :func:`fused_rows`. Writes the
    weights to ``P`` and the values to ``V`` (any float dtype); returns False (and stops) at the
    first row with a non-finite entry.
    """
    B, n = A.shape
    l = np.empty(n)
    s = np.empty(n)
    p = np.empty(n)
    for b in range(B):
        if not _load_row(A, b, l):
            return False
        if which == 0:
            val, _, _ = fused_cvar_row(l, p1, int(p2), p3, p)
        elif which == 1:
            val, _, _ = fused_kl_penalty_row(l, p1, p2, p)
        elif which == 4 and p2 > 0.0:  # spectral, KL penalty (w, logw: the spectrum and its log)
            scale = 1.0 / p1
            for i in range(n):
                s[i] = l[i] * scale
            div = _perm_kl_row_logw(s, order[b], w, logw, p)
            val = _dot(p, l) - p1 * div
        elif which == 4:
            val, _, _ = fused_spectral_row(l, order[b], w, p1, False, p)
        else:
            for j in range(n):
                s[j] = np.float64(S[b, n - 1 - j])
            if which == 2:
                val, _, _ = fused_chi2_penalty_row(l, s, p1, p)
            else:
                val, _, _ = fused_chi2_ball_row(l, s, p1, p)
        _store_row(p, P, V, b, val)
    return True


@numba.njit(cache=True, error_model="numpy")
def fused_root_batch(which, A, p1, p2, tol, max_iter, X, P, V):  # pragma: no cover - compiled
    """Root-find fused solvers (``which``: :data:`ROOT_KINDS`) on every row of ``A``.

    ``X`` (``(B,)`` float64) holds the warm starts (NaN for none) on entry and the roots on exit.
    Returns 0 (all converged), 1 (a non-finite entry) or 2 (a root-find did not converge).
    """
    B, n = A.shape
    l = np.empty(n)
    p = np.empty(n)
    status = 0
    for b in range(B):
        if not _load_row(A, b, l):
            return 1
        if which == 0:
            val, x, done = fused_kl_ball_row(l, p1, tol, max_iter, X[b], p)
        elif which == 1:
            val, x, done = fused_cr_ball_row(l, p1, p2, tol, max_iter, X[b], p)
        elif which == 2:
            val, x, done = fused_cr_penalty_row(l, p1, p2, tol, max_iter, X[b], p)
        else:
            val, x, done = fused_holistic_row(l, p1, p2, tol, max_iter, X[b], p)
        X[b] = x
        if not done:
            status = 2
        _store_row(p, P, V, b, val)
    return status


@numba.njit(cache=True, error_model="numpy")
def _desc_keys_f32(U):  # pragma: no cover - compiled
    """64-bit keys of the float32 bits ``U`` (``(B, n)`` uint32): an order-preserving map of the
    value, complemented (descending order), above the column index."""
    B, n = U.shape
    K = np.empty((B, n), dtype=np.uint64)
    for b in range(B):
        for i in range(n):
            u = np.uint64(U[b, i])
            key = u if u >= np.uint64(0x80000000) else u ^ np.uint64(0x7FFFFFFF)
            K[b, i] = (key << np.uint64(32)) | np.uint64(i)
    return K


@numba.njit(cache=True, error_model="numpy")
def _low_index(K):  # pragma: no cover - compiled
    B, n = K.shape
    out = np.empty((B, n), dtype=np.intp)
    for b in range(B):
        for i in range(n):
            out[b, i] = np.intp(K[b, i] & np.uint64(0xFFFFFFFF))
    return out


def desc_order_f32(a: np.ndarray) -> np.ndarray:
    """Per row of the finite, C-contiguous float32 ``(B, n)`` array ``a``, the indices sorting it
    in descending order, by one NumPy sort of 64-bit keys (order-preserving bits of the value
    above the index): several times faster than ``argsort`` at training sizes. Tied values keep
    index order."""
    K = _desc_keys_f32(a.view(np.uint32))
    K.sort(axis=1)
    return _low_index(K)


@numba.njit(cache=True, error_model="numpy")
def log_weights(w):  # pragma: no cover - compiled
    """``log w`` (``-inf`` where ``w <= 0``), as the KL permutahedron projection takes it."""
    out = np.empty(w.shape[0])
    for i in range(w.shape[0]):
        out[i] = math.log(w[i]) if w[i] > 0 else -np.inf
    return out


@numba.njit(cache=True, error_model="numpy")
def _perm_kl_row_logw(z, order, w, logw, out):  # pragma: no cover - compiled
    """``_perm_kl_rows`` for one row with ``log w`` precomputed and one ``exp`` per merge;
    returns ``KL(out || uniform)``."""
    n = z.shape[0]
    lse = np.empty(n)
    ws = np.empty(n)
    val = np.empty(n)
    cnt = np.empty(n, dtype=np.int64)
    top = -1
    for i in range(n):
        zi = z[order[i]]
        top += 1
        lse[top] = zi
        ws[top] = w[i]
        val[top] = zi - logw[i]
        cnt[top] = 1
        while top > 0 and val[top - 1] <= val[top]:
            x = lse[top - 1]
            y = lse[top]
            if x == -np.inf:
                m = y
            elif y == -np.inf:
                m = x
            else:
                m = max(x, y)
                m = m + math.log1p(math.exp(-abs(x - y)))
            lse[top - 1] = m
            ws[top - 1] += ws[top]
            cnt[top - 1] += cnt[top]
            val[top - 1] = m - math.log(ws[top - 1]) if ws[top - 1] > 0 else np.inf
            top -= 1
    j = 0
    tot = 0.0
    s1 = 0.0
    for blk in range(top + 1):
        v = val[blk]
        for _ in range(cnt[blk]):
            k = order[j]
            e = z[k] - v
            q = math.exp(e)
            out[k] = q
            tot += q
            s1 += q * e
            j += 1
    for i in range(n):
        out[i] /= tot
    # KL(p || uniform) = sum_i p_i log(n p_i) with log p_i = z_i - v_blk - log(tot): no log per entry
    return s1 / tot - math.log(tot) + math.log(n)

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

Inputs are ``(B, n)`` float64 CPU tensors; rows are independent. The fused one-row solvers and
batch drivers of the training fast path live in :mod:`optlayers.kernels.dro_fused`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .vmath_numba import vexpm1, vlog1p

__all__ = ["cvar_numba", "chi2_ball_numba", "perm_proj_l2_numba", "perm_proj_kl_numba", "kl_ball_root_numba",
           "cr_ball_root_numba", "cr_penalty_root_numba", "holistic_root_numba"]


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
def pav_ratios(x, w, xs, ws, cnt):  # pragma: no cover - compiled
    """Pool adjacent violators of the ratios ``x_i / w_i`` (``w = None``: all weights 1, the
    means of ``x``) for a non-increasing fit: blocks merge while a block's ratio ``Σx / Σw`` is at
    most the next one's (compared cross-multiplied, ``Σx · w_i <= x_i · Σw``). Writes each block's ``Σx``,
    ``Σw`` and size (float) to ``xs``, ``ws`` and ``cnt`` and returns the number of blocks.
    ``xs`` may be ``x`` itself (while entry ``i`` is read, at most ``i - 1`` blocks have been
    stored, at indices below ``i``); with ``w = None``, ``ws`` may be ``cnt``.

    The last block is carried in registers and stored when the next one starts, so an entry that
    starts no merge costs one comparison and no stack traffic; the sums and comparisons are those
    of the textbook stack form (the same operands, so the same result to the bit).
    """
    n = x.shape[0]
    if n == 0:
        return 0
    top = -1
    cx = x[0]
    cw = 1.0 if w is None else w[0]
    cc = 1.0
    for i in range(1, n):
        xi = x[i]
        wi = 1.0 if w is None else w[i]
        if cx * wi <= xi * cw:  # the current block's ratio is at most entry i's: pool
            cx += xi
            cw += wi
            cc += 1.0
            while top >= 0 and xs[top] * cw <= cx * ws[top]:
                cx += xs[top]
                cw += ws[top]
                cc += cnt[top]
                top -= 1
        else:
            top += 1
            xs[top] = cx
            ws[top] = cw
            cnt[top] = cc
            cx = xi
            cw = wi
            cc = 1.0
    top += 1
    xs[top] = cx
    ws[top] = cw
    cnt[top] = cc
    return top + 1


@numba.njit(cache=True)
def pav_means(y, sums, cnt):  # pragma: no cover - compiled
    """:func:`pav_ratios` of the means of ``y``: the block sums and sizes in ``sums`` and ``cnt``
    (``sums`` may be ``y``)."""
    return pav_ratios(y, None, sums, cnt, cnt)


@numba.njit(cache=True)
def _perm_l2_rows(Z, order, w, out):  # pragma: no cover - compiled
    """Euclidean projection of each row onto the permutahedron of ``w`` (descending)."""
    B, n = Z.shape
    y = np.empty(n)
    sums = np.empty(n)
    cnt = np.empty(n)
    for b in range(B):
        for i in range(n):
            y[i] = Z[b, order[b, i]] - w[i]
        nb = pav_means(y, sums, cnt)
        j = 0
        tot = 0.0
        for blk in range(nb):
            v = sums[blk] / cnt[blk]
            for _ in range(int(cnt[blk])):
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


@numba.njit(cache=True, fastmath={"contract"})
def kl_terms(a, c, shift, S, EM):  # pragma: no cover - compiled
    """``S = c a - shift`` and ``EM = expm1(S)`` (a vectorized loop, see :mod:`.vmath_numba`)."""
    for i in range(a.shape[0]):
        s = a[i] * c - shift
        S[i] = s
        EM[i] = vexpm1(s)


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"}, error_model="numpy")
def _cr_sums(a, c, beta):  # pragma: no cover - compiled
    """``(Σ t^β/t, Σ t^β, Σ t^β t)`` over ``t = 1 + c a > 0`` (reassociated: vectorized for the
    exponents ``_powb`` does without ``pow``)."""
    s_m = 0.0
    s_0 = 0.0
    s_1 = 0.0
    for i in range(a.shape[0]):
        t = 1.0 + a[i] * c
        pos = t > 0.0
        tp = t if pos else 1.0
        tb = _powb(tp, beta) if pos else 0.0
        s_m += tb / tp
        s_0 += tb
        s_1 += tb * tp
    return s_m, s_0, s_1


@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _holistic_terms(d, e, W, LG):  # pragma: no cover - compiled
    """``W = 1 / (1 + e d)`` and ``LG = log1p(e d)`` (a vectorized loop, see :mod:`.vmath_numba`)."""
    for i in range(d.shape[0]):
        y = d[i] * e
        W[i] = 1.0 / (y + 1.0)
        LG[i] = vlog1p(y)


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _holistic_sums(q, W, LG):  # pragma: no cover - compiled
    """``(Σ q LG, Σ q W, Σ q W²)`` (reassociated: a vectorized reduction)."""
    g = 0.0
    h = 0.0
    k2 = 0.0
    for i in range(q.shape[0]):
        qw = q[i] * W[i]
        g += q[i] * LG[i]
        h += qw
        k2 += qw * W[i]
    return g, h, k2


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _kl_sums(S, EM):  # pragma: no cover - compiled
    """``(Σs, Σem, Σ em·s, Σs², Σ em·s²)`` (reassociated: a vectorized reduction)."""
    ss = 0.0
    sem = 0.0
    sems = 0.0
    sss = 0.0
    semss = 0.0
    for i in range(S.shape[0]):
        s = S[i]
        em = EM[i]
        ems = em * s
        ss += s
        sem += em
        sems += ems
        sss += s * s
        semss += ems * s
    return ss, sem, sems, sss, semss


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
        S = np.empty(n)
        EM = np.empty(n)
        kl_terms(a, c, shift, S, EM)
        ss, sem, sems, sss, semss = _kl_sums(S, EM)
        A = sem / n
        S0 = n * (1.0 + A)
        m1 = (ss + sems) / S0
        kl = max(m1 - math.log1p(A), 0.0)
        var = max((sss + semss) / S0 - m1 * m1, 0.0)
        return logrho - np.log(kl), var / kl
    if kind == _CR_BALL:  # prm = (log rho, beta, k, k(k-1), (k-1) log n, accurate)
        logrho, beta, k, kk, logscale, accurate = prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]
        c = math.exp(-x)
        s_m, s_0, s_1 = _cr_sums(a, c, beta)
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
        s_m, s_0, _ = _cr_sums(a, c, beta)
        return logT - beta * np.log(m) - np.log(s_0), beta * s_m / (m * s_0)
    # holistic: a = delta, q = poisoned weights, prm = (r, alpha)
    r, alpha = prm[0], prm[1]
    e = math.exp(-x)
    W = np.empty(n)
    LG = np.empty(n)
    _holistic_terms(a, e, W, LG)
    G1, h, k2 = _holistic_sums(q, W, LG)
    h += alpha
    k2 += alpha
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

"""Numba kernels of the DRO training fast path (:mod:`optlayers.solvers.dro.fused`).

Fused one-row solvers — the whole inner problem of one uncertainty set (selection, sort and
scan, pool-adjacent-violators, or the safeguarded 1-D Newton–bisection and the final weights) in
one compiled call per row, transcribing the PyTorch solvers of :mod:`optlayers.solvers.dro` step
by step — and the batch drivers that run them over a ``(B, n)`` float32/float64 array read in
place. The shared building blocks (selection, χ² scan, PAV, the Newton–bisection) come from
:mod:`optlayers.kernels.dro_kernels`. Imported on first use only (it compiles with Numba).

The spectral risks' sort and permutahedron projections live in
:mod:`optlayers.kernels.dro_spectral_fused`.

Example:
    >>> import numpy as np
    >>> from optlayers.kernels.dro_fused import CLOSED_KINDS, fused_closed_batch
    >>> A = np.array([[1.0, 2.0, 3.0, 4.0]]); P = np.empty_like(A); V = np.empty(1); D = np.empty(1)
    >>> fused_closed_batch(CLOSED_KINDS["cvar"], A, 0.5, 2.0, 0.0, P, V, D)
    True
    >>> P.tolist(), V.tolist()
    ([[0.0, 0.0, 0.5, 0.5]], [3.5])
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from .dro_kernels import (
    _CR_BALL,
    _CR_PEN,
    _HOLISTIC,
    _KL_BALL,
    _chi2_rows,
    _cr_f,
    _cr_sums,
    _cvar_rows,
    _newton_bisect_row,
    _powb,
    _select_desc,
    kl_terms,
)
from .dro_spectral_fused import (
    desc_sorted_radix,
    fused_spectral_row,
    perm_kl_row_logw,
    row_order,
    spectral_core,
)
from .vmath_numba import vexp_array

__all__ = [
    "fused_kl_ball_row", "fused_cr_ball_row", "fused_cr_penalty_row", "fused_holistic_row",
    "fused_kl_penalty_row", "fused_chi2_penalty_row", "fused_cvar_row", "fused_chi2_ball_row",
    "fused_rows", "CLOSED_KINDS", "ROOT_KINDS", "fused_closed_batch",
    "fused_root_batch", "fused_spectral_batch"
]


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
def _uniform_row(l, p):  # pragma: no cover - compiled
    """``p = 1/n`` (a ball of radius 0); returns the mean of ``l``."""
    n = l.shape[0]
    for i in range(n):
        p[i] = 1.0 / n
    return _dot(p, l)


@numba.njit(cache=True, error_model="numpy")
def fused_kl_ball_row(l, rho, tol, max_iter, warm, p):  # pragma: no cover - compiled
    """KL ball (``solve_kl_ball``)."""
    n = l.shape[0]
    lmax, lmin, n_top = _max_min_top(l)
    if rho <= 0.0:
        return _uniform_row(l, p), np.nan, True
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
    kl_terms(Z, c, shift, np.empty(n), p)  # p = expm1(c Z - shift)
    A = 0.0
    for i in range(n):
        A += p[i]
    S0 = n * (1.0 + A / n)
    for i in range(n):
        p[i] = (p[i] + 1.0) / S0
    return _dot(p, l), hi, done


@numba.njit(cache=True, error_model="numpy")
def _cr_weights(Z, c, beta, p):  # pragma: no cover - compiled
    """``p = t^beta / sum(t^beta)`` with ``t = (1 + c Z)_+``."""
    _, s0, _ = _cr_sums(Z, c, beta)
    inv = 1.0 / s0
    for i in range(Z.shape[0]):
        t = 1.0 + Z[i] * c
        p[i] = _powb(t, beta) * inv if t > 0.0 else 0.0


@numba.njit(cache=True, error_model="numpy")
def fused_cr_ball_row(l, k, rho, tol, max_iter, warm, p):  # pragma: no cover - compiled
    """Cressie–Read ball, ``k != 2`` (``solve_cressie_read`` with ``rho``)."""
    n = l.shape[0]
    lmax, lmin, n_top = _max_min_top(l)
    if rho <= 0.0:
        return _uniform_row(l, p), np.nan, True
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
    _, s0, s1 = _cr_sums(Z, c, beta)
    inv = 1.0 / s0
    for i in range(n):
        t = 1.0 + Z[i] * c
        p[i] = _powb(t, beta) * inv if t > 0.0 else 0.0
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
    # poisoned weights q (holistic_poisoned_weights) and the smallest loss they keep
    m = alpha * n
    q = np.empty(n)
    if m <= 0.0:
        q[:] = 1.0 / n
        spread = lmin
    elif m >= n:
        q[:] = 0.0
        spread = np.inf
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
        q_eq = max(1.0 / n - share, 0.0)
        spread = np.inf
        for i in range(n):
            li = l[i]
            qi = 0.0 if li < tau else (q_eq if li == tau else 1.0 / n)
            q[i] = qi
            if qi > 0.0 and li < spread:
                spread = li
    if r <= 0.0 or lmax - spread <= 0.0:
        p[:] = q
        _argmax_row(l, lmax, n_top, p, alpha, True)
        return _dot(p, l), np.nan, True
    R = lmax - lmin
    delta = np.empty(n)
    for i in range(n):
        delta[i] = (lmax - l[i]) / R
    x0 = warm if math.isfinite(warm) else _holistic_start(q, delta, r)
    prm = np.empty(2)
    prm[0] = r
    prm[1] = alpha
    _, _, hi, _, done, _ = _newton_bisect_row(_HOLISTIC, delta, q, prm, -np.inf, np.inf, x0, tol, max_iter, 1,
                                              4e-16, True, 1.0, -700.0, 700.0)
    u = hi if math.isfinite(hi) else _holistic_start(q, delta, r)
    e = math.exp(-u)
    for i in range(n):
        p[i] = q[i] / (delta[i] * e + 1.0)
    h = alpha + _sum(p)
    inv = 1.0 / h
    top = (alpha / h) / n_top
    val = 0.0
    for i in range(n):
        pi = p[i] * inv + (top if l[i] == lmax else 0.0)
        p[i] = pi
        val += pi * l[i]
    return val, hi, done


@numba.njit(cache=True, error_model="numpy")
def fused_kl_penalty_row(l, lam, sign, p):  # pragma: no cover - compiled
    """KL penalty (``solve_kl_penalty``; ``sign = -1`` the optimistic variant)."""
    n = l.shape[0]
    zmax = -np.inf
    for i in range(n):
        zmax = max(zmax, sign * l[i] / lam)
    E = np.empty(n)
    for i in range(n):
        E[i] = sign * l[i] / lam - zmax
    vexp_array(E, p)
    se, ez = _sum_and_dot(p, E)
    # KL(p || u) = sum_i p_i log(n p_i) with log p_i = E_i - log(se): no log per entry
    kl = max(ez / se - math.log(se) + math.log(n), 0.0)
    inv = 1.0 / se
    for i in range(n):
        p[i] *= inv
    return _dot(p, l) - sign * lam * kl, np.nan, True


@numba.njit(cache=True, error_model="numpy")
def _holistic_start(q, delta, r):  # pragma: no cover - compiled
    """The cold start of the holistic root-find: ``½ log(Var_q(δ) / 2r)``."""
    s1, s2 = _weighted_moments(q, delta)
    return 0.5 * np.log(max((s2 - s1 * s1) / (2.0 * r), 1e-300))


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _weighted_moments(q, d):  # pragma: no cover - compiled
    """``(Σ q d, Σ q d²)`` (reassociated: a vectorized reduction)."""
    s1 = 0.0
    s2 = 0.0
    for i in range(q.shape[0]):
        qd = q[i] * d[i]
        s1 += qd
        s2 += qd * d[i]
    return s1, s2


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _sum(x):  # pragma: no cover - compiled
    """``Σ x`` (reassociated: a vectorized reduction)."""
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i]
    return s


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _sum_and_dot(x, y):  # pragma: no cover - compiled
    """``(Σ x, Σ x y)`` (reassociated: a vectorized reduction)."""
    s = 0.0
    d = 0.0
    for i in range(x.shape[0]):
        s += x[i]
        d += x[i] * y[i]
    return s, d


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"}, error_model="numpy")
def _sum_above(l, eta):  # pragma: no cover - compiled
    """``(Σ_{l_i > η} l_i, #{l_i > η})`` (reassociated: a vectorized reduction)."""
    s = 0.0
    k = 0.0
    for i in range(l.shape[0]):
        above = l[i] > eta
        s += l[i] if above else 0.0
        k += 1.0 if above else 0.0
    return s, k


@numba.njit(cache=True, error_model="numpy")
def fused_chi2_penalty_row(l, lam, p):  # pragma: no cover - compiled
    """Chi-square penalty (``solve_chi2_penalty``): ``p = c (l - η)_+`` with ``c = 1 / (2 λ n)``
    and ``Σ p = 1``, the threshold by Michelot's iteration instead of a sort: with ``S`` the
    entries above the current threshold, ``η = (Σ_S l - 1/c) / |S|`` rises monotonically and ``S``
    shrinks until it no longer changes (a few passes; the same threshold as the sort and scan)."""
    n = l.shape[0]
    c = 1.0 / (2.0 * lam * n)
    tgt = 1.0 / c
    sm = 0.0
    for i in range(n):
        sm += l[i]
    k = float(n)
    eta = (sm - tgt) / k
    for _ in range(n):
        s2, k2 = _sum_above(l, eta)
        if k2 >= k or k2 == 0.0:
            break
        sm, k = s2, k2
        eta = (sm - tgt) / k
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


@numba.njit(cache=True, fastmath={"contract", "reassoc", "nsz"}, error_model="numpy")
def _moments_above(d, e):  # pragma: no cover - compiled
    """``(Σ d, Σ d², #)`` over the entries ``d > e`` (reassociated: a vectorized reduction)."""
    s = 0.0
    s2 = 0.0
    k = 0.0
    for i in range(d.shape[0]):
        above = d[i] > e
        x = d[i] if above else 0.0
        s += x
        s2 += x * x
        k += 1.0 if above else 0.0
    return s, s2, k


@numba.njit(cache=True, error_model="numpy")
def chi2_ball_iterate_row(l, rho, p, max_passes=64):  # pragma: no cover - compiled
    r"""Chi-square ball ``(1/n) Σ (n p_i - 1)² ≤ ρ``, ``ρ > 0``, without a sort; returns the value.

    The solution is ``p = c (l - η)_+`` where, on its support ``S = {l > η}`` of size ``k`` with
    mean ``μ`` and variance ``σ²`` of the losses, ``c = sqrt(((1 + ρ)/n - 1/k) / (k σ²))`` and
    ``η = μ - 1/(k c)`` (the two constraints). Starting from ``S`` = all entries, ``S`` is replaced
    by ``{l > η}`` until it no longer changes (1–6 passes in practice); the set it settles on
    satisfies the optimality conditions, so it is the solution of the sort-and-scan of
    ``chi2_ball_reference``, which runs instead when the iteration leaves the valid range
    (``k < n / (1 + ρ)``), the variance is too small for the one-pass formula, or ``max_passes``
    passes do not settle.
    """
    n = l.shape[0]
    lmax, _, n_top = _max_min_top(l)
    if rho >= n / n_top - 1.0:
        _argmax_row(l, lmax, n_top, p, 1.0, False)
        return lmax
    d = np.empty(n)
    for i in range(n):
        d[i] = l[i] - lmax
    sm, s2, k = _moments_above(d, -np.inf)
    for _ in range(max_passes):
        mean = sm / k
        var = s2 / k - mean * mean
        need = (1.0 + rho) / n - 1.0 / k
        if need < -1e-15 or not (var > 1e-8 * mean * mean):
            break
        c = math.sqrt(max(need, 0.0) / (k * var))
        if c == 0.0 or not math.isfinite(c):
            break
        e = mean - 1.0 / (k * c)
        sm_, s2_, k_ = _moments_above(d, e)
        if k_ == k:
            tot = 0.0
            for i in range(n):
                v = c * (d[i] - e)
                v = v if v > 0.0 else 0.0
                p[i] = v
                tot += v
            inv = 1.0 / tot
            for i in range(n):
                p[i] *= inv
            return _dot(p, l)
        sm, s2, k = sm_, s2_, k_
    val, _, _ = fused_chi2_ball_row(l, -np.sort(-l), rho, p)
    return val


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
    if kind == "chi2_penalty":  # prm = (lam,)
        for b in range(B):
            val[b], _, _ = fused_chi2_penalty_row(a[b], prm[0], p[b])
        return p, val, xs, conv
    if kind == "chi2_ball":  # prm = (rho,)
        S = -np.sort(-a, axis=1)
        for b in range(B):
            val[b], _, _ = fused_chi2_ball_row(a[b], S[b], prm[0], p[b])
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
def fused_closed_batch(which, A, p1, p2, p3, P, V, D):  # pragma: no cover - compiled
    """Closed-form fused solvers on every row of ``A`` (``(B, n)``, float32 or float64).

    ``which``: :data:`CLOSED_KINDS` other than ``"spectral"`` (:func:`fused_spectral_batch`);
    ``p1, p2, p3``: the parameters of :func:`fused_rows`. Writes the weights to ``P`` and the
    values to ``V`` (any float dtype) and the penalties ``λ D(p)`` to ``D`` (float64; 0 for the
    sets without a penalty: the value is then ``<p, l>``); returns False (and stops) at the first
    row with a non-finite entry.
    """
    B, n = A.shape
    l = np.empty(n)
    p = np.empty(n)
    for b in range(B):
        if not _load_row(A, b, l):
            return False
        if which == 0:
            val, _, _ = fused_cvar_row(l, p1, int(p2), p3, p)
        elif which == 1:
            val, _, _ = fused_kl_penalty_row(l, p1, p2, p)
        elif which == 2:
            val, _, _ = fused_chi2_penalty_row(l, p1, p)
        else:  # the chi-square ball, by the support iteration (the sorted scan if it does not settle)
            val = chi2_ball_iterate_row(l, p1, p)
        D[b] = _dot(p, l) - val if (which == 1 or which == 2) else 0.0
        _store_row(p, P, V, b, val)
    return True


@numba.njit(cache=True, error_model="numpy")
def fused_spectral_batch(A, w, logw, lam, kl, P, V, D):  # pragma: no cover - compiled
    """The spectral risks with a penalty (``w`` the spectrum in descending order, ``logw`` its log
    (:func:`log_weights`; KL penalty), ``lam`` the penalty, ``kl`` KL or χ²) on every float32 or
    float64 row of ``A``: each row sorted in the call (:func:`desc_sorted_radix`), projected
    onto the permutahedron (:func:`spectral_core`), the weights written to ``P``, the values to
    ``V`` and the penalties ``λ D(p)`` to ``D``. Returns False at the first row with a non-finite
    entry."""
    B, n = A.shape
    order = np.empty(n, dtype=np.int32)
    K = np.empty(2 * n, dtype=np.uint64)  # the sort's workspace; then the sorted row and q
    keys = K[:n]
    keys2 = K[n:]
    cnt = np.empty((3, 2048), dtype=np.int32)
    ls = keys2.view(np.float64)
    q = keys.view(np.float64)
    stack = np.empty(3 * n)
    for b in range(B):
        if not desc_sorted_radix(A[b], order, keys, keys2, cnt):
            return False
        val, _, pen = spectral_core(ls, order, w, logw, lam, kl, P, b, q, stack)
        if math.isfinite(val):
            V[b] = val
            D[b] = pen
            continue
        l = np.empty(n)
        p = np.empty(n)
        _load_row(A, b, l)
        if kl:  # a spread of l / λ over 700: the log-domain PAV
            scale = 1.0 / lam
            s = np.empty(n)
            for i in range(n):
                s[i] = l[i] * scale
            div = perm_kl_row_logw(s, row_order(order), w, logw, p)
            val = _dot(p, l) - lam * div
        else:
            val, _, _ = fused_spectral_row(l, row_order(order), w, lam, False, p)
        D[b] = _dot(p, l) - val
        _store_row(p, P, V, b, val)
    return True


@numba.njit(cache=True, error_model="numpy")
def fused_root_batch(which, A, p1, p2, tol, max_iter, X, P, V, D):  # pragma: no cover - compiled
    """Root-find fused solvers (``which``: :data:`ROOT_KINDS`) on every row of ``A``.

    ``X`` (``(B,)`` float64) holds the warm starts (NaN for none) on entry and the roots on exit;
    ``D`` (``(B,)`` float64) receives the penalties (Cressie–Read penalty; 0 for the balls).
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
        D[b] = _dot(p, l) - val if which == 2 else 0.0
        _store_row(p, P, V, b, val)
    return status

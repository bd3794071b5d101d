r"""Numba (CPU) kernel: the whole interior-point solve of a batch of dense QPs, one element at a time.

Imported only by its loader (:mod:`optlayers.kernels.qp_ipm`). For each batch element it runs,
with all its iterations in cache, exactly the iteration of
:meth:`optlayers.solvers.qp.InteriorPoint._run` (the PyTorch specification) in its
normal-equation form without refinement: the static regularization ``δ`` and constant part
``H0 = Q + δI + AᵀA/δ`` of :mod:`optlayers.solvers.qp.kkt`, the cold-start point (or the given
warm start), the homogeneous-embedding residuals, the stopping test ``max(r_p, r_d, r_gap) <=
rtol`` (floored at ``atol / rtol``), the infeasibility and unboundedness certificates (tested once
``κ > τ``), NONFINITE (non-finite data are not solved; non-finite iterates are reported),
STAGNATION (five steps below ``1e-8``), Mehrotra's predictor–corrector with three solves per
iteration (the two predictor right-hand sides in one pass), and the Cholesky factorization of

.. math::

    H = H_0 + G^\top (W + \delta I)^{-1} G = U^\top U,

retried once with a larger ridge when it fails (``ok = False`` and a zero step when the retry
fails too, as ``_safe_cholesky(retry=True)``). On request it also factors ``H`` at the returned
solution's weights, which the gradient (:class:`optlayers.solvers.qp.adjoint.KKTCache`) then uses
instead of forming and factoring it again, with the compiled solve :func:`kkt_solve_numba`.

Arithmetic is in the dtype of the data (float32 or float64, one compiled specialization each),
like the PyTorch path, so the tolerances mean the same; every scalar constant is read from a typed
array ``cst`` so that no float64 literal promotes float32 code. Shared data (leading batch
dimension 1) are read in place.

The loops are written for LLVM's loop vectorizer (Numba leaves the SLP vectorizer off, so only
innermost contiguous loops vectorize): ``Gᵀ D G`` is accumulated as rank-four updates, four rows
of ``G`` at a time, into two rows of the lower triangle of ``H`` at once (each load of ``G`` feeds
eight products); the Cholesky factorization is left-looking
by rows of ``U = Lᵀ`` (four earlier rows per pass, rows read through views from the diagonal on);
the triangular solves use row ``axpy`` updates and row dot products. The functions use the
``reassoc``/``contract`` fast-math flags only, so reductions vectorize and use FMA while NaN and
infinity keep their IEEE meaning, which the status tests read. Measured on the benchmark problem
(``benchmarks/bench_qp.py``: n = 50, 50 inequalities, 10 equalities, one thread, a shared 2-core
AMD EPYC): about 23–27 µs per element-iteration in float64 (Gᵀ D G ~10 µs, Cholesky ~6 µs, the
three solves ~5.5 µs), against ~100–130 µs for the batched PyTorch loop. Status codes follow
:class:`optlayers.Status`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .sparse_simplex_numba import parallel_launch, parallel_threads

__all__ = ["qp_ipm_numba", "constants"]

_FM = {"reassoc", "contract"}

# Indices into the typed constant array ``cst``.
_ZERO, _ONE, _TWO, _HALF, _MP1, _RTOL, _FLOOR, _EPSINF, _TINY, _FRAC, _BIG, _INF, _R1, _R2, _SMALL = range(15)

_SUCCESS, _MAX_ITER, _NONFINITE, _STAGNATION, _INFEASIBLE, _UNBOUNDED = 0, 1, 2, 3, 5, 6


def constants(dtype: np.dtype, m: int, rtol: float, floor: float, eps_inf: float,
              step_fraction: float) -> np.ndarray:
    """The typed constants of one solve (see the index names above)."""
    fi = np.finfo(dtype)
    vals = [0.0, 1.0, 2.0, 0.5, m + 1.0, rtol, floor, eps_inf, float(fi.tiny), step_fraction, float(fi.max),
            math.inf, 1e4, 1e3 * float(fi.eps), 1e-8]
    return np.array(vals, dtype=dtype)


@numba.njit(cache=True, fastmath=_FM, inline="always")
def _fmax(a, b):  # pragma: no cover - compiled
    """``torch.maximum`` of two scalars: NaN if either is NaN."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@numba.njit(cache=True, fastmath=_FM)
def _amax(v, lo, hi, zero):  # pragma: no cover - compiled
    """``max |v[lo:hi]|`` (0 when empty), NaN if any entry is NaN."""
    mx = zero
    for i in range(lo, hi):
        a = abs(v[i])
        if a > mx or a != a:
            mx = a
    return mx


@numba.njit(cache=True, fastmath=_FM)
def _dot(a, b, lo, hi, zero):  # pragma: no cover - compiled
    acc = zero
    for i in range(lo, hi):
        acc += a[i] * b[i]
    return acc


@numba.njit(cache=True, fastmath=_FM)
def _matvec(M, v, out, zero):  # pragma: no cover - compiled
    """``out = M v`` (row dot products)."""
    r, c = M.shape
    for i in range(r):
        acc = zero
        for j in range(c):
            acc += M[i, j] * v[j]
        out[i] = acc


@numba.njit(cache=True, fastmath=_FM)
def _matvec_t(M, v, out, zero):  # pragma: no cover - compiled
    """``out = Mᵀ v`` (axpy over the rows of ``M``)."""
    r, c = M.shape
    for j in range(c):
        out[j] = zero
    for i in range(r):
        vi = v[i]
        for j in range(c):
            out[j] += vi * M[i, j]


@numba.njit(cache=True, fastmath=_FM)
def _cholesky(H, U):  # pragma: no cover - compiled
    """Upper Cholesky factor ``U`` (``UᵀU = H``, i.e. ``U = Lᵀ``) of ``H`` given by its lower triangle.

    Left-looking by rows of ``U``: row ``j`` is ``H[j, j:]`` minus ``U[t, j] U[t, j:]`` for
    ``t < j`` (four rows per pass), then scaled by the pivot. Returns False on a non-positive (or
    NaN) pivot, like LAPACK's ``potrf``. Rows are read from offset ``j`` through views indexed from
    0, which lets LLVM vectorize the updates.
    """
    n = H.shape[0]
    for j in range(n):
        uj = U[j, j:]
        for c in range(n - j):  # row j of the upper triangle = column j of the lower one
            uj[c] = H[j + c, j]
        t = 0
        while t + 4 <= j:
            u0 = U[t, j:]
            u1 = U[t + 1, j:]
            u2 = U[t + 2, j:]
            u3 = U[t + 3, j:]
            a0 = u0[0]
            a1 = u1[0]
            a2 = u2[0]
            a3 = u3[0]
            for c in range(n - j):
                uj[c] -= a0 * u0[c] + a1 * u1[c] + a2 * u2[c] + a3 * u3[c]
            t += 4
        while t < j:
            u0 = U[t, j:]
            a0 = u0[0]
            for c in range(n - j):
                uj[c] -= a0 * u0[c]
            t += 1
        piv = uj[0]
        if not (piv > 0):
            return False
        d = math.sqrt(piv)
        uj[0] = d
        for c in range(1, n - j):
            uj[c] = uj[c] / d
    return True


@numba.njit(cache=True, fastmath=_FM)
def _gdg(H0, C, k, dd, H):  # pragma: no cover - compiled
    """Lower triangle of ``H = H0 + Cᵀ diag(dd) C`` over the rows ``r >= k`` of ``C``.

    Rank-four updates (four rows of ``C`` at a time) applied to two rows of ``H`` at once, so
    each load of ``C[r:r+4, j]`` feeds eight products. A pair of rows of ``H`` is updated up
    to its second row's diagonal rounded up to a multiple of four columns (at most ``n``): the
    few entries this touches above the diagonal are never read (only the lower triangle is),
    and the equal-length rows vectorize with fewer scalar remainders.
    """
    n = H0.shape[0]
    kc = C.shape[0]
    i = 0
    while i < n:
        ie = min(i + 2, n)
        je = min(n, ((ie + 3) // 4) * 4)
        for a in range(i, ie):
            ha = H[a]
            h0 = H0[a]
            for j in range(je):
                ha[j] = h0[j]
        i = ie
    r = k
    while r + 4 <= kc:
        c0 = C[r]
        c1 = C[r + 1]
        c2 = C[r + 2]
        c3 = C[r + 3]
        d0 = dd[r]
        d1 = dd[r + 1]
        d2 = dd[r + 2]
        d3 = dd[r + 3]
        i = 0
        while i + 2 <= n:
            je = min(n, ((i + 5) // 4) * 4)
            a0 = c0[i] * d0
            a1 = c1[i] * d1
            a2 = c2[i] * d2
            a3 = c3[i] * d3
            b0 = c0[i + 1] * d0
            b1 = c1[i + 1] * d1
            b2 = c2[i + 1] * d2
            b3 = c3[i + 1] * d3
            h0 = H[i]
            h1 = H[i + 1]
            for j in range(je):
                x0 = c0[j]
                x1 = c1[j]
                x2 = c2[j]
                x3 = c3[j]
                h0[j] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                h1[j] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            i += 2
        while i < n:
            a0 = c0[i] * d0
            a1 = c1[i] * d1
            a2 = c2[i] * d2
            a3 = c3[i] * d3
            h0 = H[i]
            for j in range(i + 1):
                h0[j] += a0 * c0[j] + a1 * c1[j] + a2 * c2[j] + a3 * c3[j]
            i += 1
        r += 4
    while r < kc:
        g = dd[r]
        cr = C[r]
        for i in range(n):
            gi = cr[i] * g
            hi = H[i]
            for j in range(i + 1):
                hi[j] += gi * cr[j]
        r += 1


@numba.njit(cache=True, fastmath=_FM)
def _factor(H0, C, k, w, delta, H, L, dd, cst):  # pragma: no cover - compiled
    """Factor ``H = H0 + Gᵀ diag(1/(w + δ)) G`` (``_safe_cholesky`` with ``retry=True``).

    Fills ``dd = [1/δ; 1/(w + δ)]``, the lower triangle of ``H`` and its upper factor ``L``
    (``LᵀL = H``); returns ``ok``. Where both attempts fail, ``L`` is the identity (solves stay
    finite) and ``ok`` is False.
    """
    n = H0.shape[0]
    kc = C.shape[0]
    one = cst[_ONE]
    for r in range(k):
        dd[r] = one / delta
    for r in range(k, kc):
        dd[r] = one / (w[r - k] + delta)
    _gdg(H0, C, k, dd, H)
    if _cholesky(H, L):
        return True
    dmax = H[0, 0] if n else cst[_ZERO]
    for i in range(1, n):
        dmax = _fmax(dmax, H[i, i])
    ridge = _fmax(cst[_R1] * delta, cst[_R2] * dmax)
    for i in range(n):
        H[i, i] += ridge
    if _cholesky(H, L):
        return True
    for i in range(n):
        for j in range(n):
            L[i, j] = cst[_ZERO]
        L[i, i] = one
    return False


@numba.njit(cache=True, fastmath=_FM)
def _solve(U, C, dd, rx, rc, ox, oc, t, zero):  # pragma: no cover - compiled
    """Regularized KKT solve (``solve_regularized``): ``ox = (UᵀU)⁻¹(rx + Cᵀ(dd∘rc))``,
    ``oc = dd∘(C ox − rc)``."""
    n = rx.shape[0]
    kc = rc.shape[0]
    for i in range(n):
        t[i] = zero
    for r in range(kc):
        v = dd[r] * rc[r]
        for j in range(n):
            t[j] += v * C[r, j]
    for i in range(n):
        t[i] = rx[i] + t[i]
    for i in range(n):  # Uᵀ y = t, by rows of U (axpy)
        yi = t[i] / U[i, i]
        t[i] = yi
        ui = U[i, i:]
        ti = t[i:]
        for j in range(1, n - i):
            ti[j] -= yi * ui[j]
    for i in range(n - 1, -1, -1):  # U x = y (row dot products)
        ui = U[i, i:]
        xi = ox[i:]
        acc = t[i]
        for j in range(1, n - i):
            acc -= ui[j] * xi[j]
        ox[i] = acc / ui[0]
    for r in range(kc):
        acc = zero
        for j in range(n):
            acc += C[r, j] * ox[j]
        oc[r] = dd[r] * (acc - rc[r])


@numba.njit(cache=True, fastmath=_FM)
def _solve2(U, C, dd, rx1, rc1, rx2, rc2, ox1, oc1, ox2, oc2, t1, t2, zero):  # pragma: no cover - compiled
    """:func:`_solve` for two right-hand sides at once (one pass over ``C`` and ``U`` for both)."""
    n = rx1.shape[0]
    kc = rc1.shape[0]
    for i in range(n):
        t1[i] = zero
        t2[i] = zero
    for r in range(kc):
        v1 = dd[r] * rc1[r]
        v2 = dd[r] * rc2[r]
        for j in range(n):
            c = C[r, j]
            t1[j] += v1 * c
            t2[j] += v2 * c
    for i in range(n):
        t1[i] = rx1[i] + t1[i]
        t2[i] = rx2[i] + t2[i]
    for i in range(n):  # Uᵀ y = t
        ui = U[i, i:]
        y1 = t1[i] / ui[0]
        y2 = t2[i] / ui[0]
        t1[i] = y1
        t2[i] = y2
        s1 = t1[i:]
        s2 = t2[i:]
        for j in range(1, n - i):
            s1[j] -= y1 * ui[j]
            s2[j] -= y2 * ui[j]
    for i in range(n - 1, -1, -1):  # U x = y
        ui = U[i, i:]
        x1 = ox1[i:]
        x2 = ox2[i:]
        a1 = t1[i]
        a2 = t2[i]
        for j in range(1, n - i):
            a1 -= ui[j] * x1[j]
            a2 -= ui[j] * x2[j]
        ox1[i] = a1 / ui[0]
        ox2[i] = a2 / ui[0]
    for r in range(kc):
        a1 = zero
        a2 = zero
        for j in range(n):
            c = C[r, j]
            a1 += c * ox1[j]
            a2 += c * ox2[j]
        oc1[r] = dd[r] * (a1 - rc1[r])
        oc2[r] = dd[r] * (a2 - rc2[r])


@numba.njit(cache=True, fastmath=_FM)
def _max_step(s, z, ds, dz, tau, kappa, dt, dk, k, cst):  # pragma: no cover - compiled
    """Largest ``α ≤ 1`` keeping ``(s, z, τ, κ) + α (ds, dz, dτ, dκ) ≥ 0`` (NaN propagates)."""
    m = s.shape[0]
    rate = -dt / tau
    r2 = -dk / kappa
    if r2 > rate or r2 != r2:
        rate = r2
    if rate == rate:
        for i in range(m):
            r = -ds[i] / s[i]
            if r > rate or r != r:
                rate = r
            r = -dz[k + i] / z[k + i]
            if r > rate or r != r:
                rate = r
    if rate != rate:
        return rate
    return cst[_ONE] / _fmax(rate, cst[_ONE])


@numba.njit(cache=True, fastmath=_FM)
def _solve_one(Q, p, C, bh, H0, delta, k, cold, x, yc, s, tk, cst, max_iter):  # pragma: no cover - compiled
    """One element's interior-point solve; ``x, yc, s, tk = [τ, κ]`` are updated in place.

    Returns ``(status, iterations, residual)``.
    """
    n = p.shape[0]
    kc = bh.shape[0]
    m = kc - k
    zero, one, two, half = cst[_ZERO], cst[_ONE], cst[_TWO], cst[_HALF]
    mp1, rtol, floor, eps_inf = cst[_MP1], cst[_RTOL], cst[_FLOOR], cst[_EPSINF]
    tiny, frac, big, inf, small_thr = cst[_TINY], cst[_FRAC], cst[_BIG], cst[_INF], cst[_SMALL]

    H = np.empty_like(H0)
    L = np.empty_like(H0)
    dd = np.empty_like(bh)
    Qx = np.empty_like(p)
    Cty = np.empty_like(p)
    Cx = np.empty_like(bh)
    rx = np.empty_like(p)
    rc = np.empty_like(bh)
    c_x = np.empty_like(p)
    t = np.empty_like(p)
    bx = np.empty_like(p)
    bx2 = np.empty_like(p)
    t2v = np.empty_like(p)
    bc = np.empty_like(bh)
    u1x = np.empty_like(p)
    u1c = np.empty_like(bh)
    u2x = np.empty_like(p)
    u2c = np.empty_like(bh)
    dx = np.empty_like(p)
    dyc = np.empty_like(bh)
    w = np.empty(m, dtype=bh.dtype)
    d_s = np.empty(m, dtype=bh.dtype)
    dsa = np.empty(m, dtype=bh.dtype)
    ds = np.empty(m, dtype=bh.dtype)

    norm_p = _amax(p, 0, n, zero)
    norm_bh = _amax(bh, 0, kc, zero)

    if cold:
        # Solve K(W = I) [x; y; z] = [-p; b; h], then shift (s, z) into the cone.
        for r in range(m):
            w[r] = one
        _factor(H0, C, k, w, delta, H, L, dd, cst)
        for i in range(n):
            bx[i] = -p[i]
        _solve(L, C, dd, bx, bh, x, yc, t, zero)
        for r in range(m):
            s[r] = -yc[k + r]
        if m:
            ap = -s[0]
            ad = -yc[k]
            for r in range(m):
                ap = _fmax(ap, -s[r])
                ad = _fmax(ad, -yc[k + r])
            if ap >= 0:
                for r in range(m):
                    s[r] = s[r] + one + ap
            if ad >= 0:
                for r in range(k, kc):
                    yc[r] = yc[r] + one + ad
        tk[0] = one
        tk[1] = one
    tau = tk[0]
    kappa = tk[1]

    status = _MAX_ITER
    iters = 0
    residual = inf
    small = 0
    for it in range(max_iter + 1):
        # ---- residuals of the embedding ----
        _matvec(Q, x, Qx, zero)
        _matvec_t(C, yc, Cty, zero)
        _matvec(C, x, Cx, zero)
        for i in range(n):
            rx[i] = Qx[i] + Cty[i] + p[i] * tau
        for r in range(kc):
            rc[r] = Cx[r] - bh[r] * tau
        for r in range(m):
            rc[k + r] += s[r]
        xQx = _dot(x, Qx, 0, n, zero)
        px = _dot(p, x, 0, n, zero)
        bhy = _dot(bh, yc, 0, kc, zero)
        rtau = kappa + px + bhy + xQx / tau
        # ---- convergence on the unscaled point ----
        n_Qx = _amax(Qx, 0, n, zero)
        n_Cty = _amax(Cty, 0, n, zero)
        n_Cx = _amax(Cx, 0, kc, zero)
        pres = _amax(rc, 0, kc, zero)
        pscale = _fmax(_fmax(n_Cx, _amax(s, 0, m, zero)), norm_bh * tau)
        dres = _amax(rx, 0, n, zero)
        dscale = _fmax(_fmax(n_Qx, n_Cty), norm_p * tau)
        t2 = tau * tau
        gap = zero
        for r in range(m):
            gap += s[r] * yc[k + r]
        obj_scale = _fmax(abs(half * xQx + px * tau), abs(half * xQx + bhy * tau))
        fl = floor * tau
        res = _fmax(_fmax(pres / _fmax(pscale, fl), dres / _fmax(dscale, fl)), abs(gap) / _fmax(obj_scale, floor * t2))
        if res != res:
            res = inf
        elif res == inf:
            res = big
        residual = res
        if res <= rtol:
            status = _SUCCESS
            break
        # ---- infeasibility certificates (only once κ > τ) ----
        if kappa > tau:
            nyz = _fmax(_amax(yc, 0, kc, zero), tiny)
            cp = -bhy / nyz
            if cp > eps_inf * norm_bh and n_Cty / nyz <= eps_inf * cp:
                status = _INFEASIBLE
                break
            nx = _fmax(_amax(x, 0, n, zero), tiny)
            cd = -px / nx
            viol = _amax(Cx, 0, k, zero)
            for r in range(k, kc):
                if Cx[r] > viol or Cx[r] != Cx[r]:
                    viol = Cx[r]
            rd = _fmax(n_Qx, viol) / nx
            if cd > eps_inf * norm_p and rd <= eps_inf * cd:
                status = _UNBOUNDED
                break
        if not math.isfinite(res) and not math.isfinite(rtau):
            status = _NONFINITE
            break
        if small >= 5:
            status = _STAGNATION
            break
        if it == max_iter:
            break
        iters += 1

        # ---- Newton step (Mehrotra predictor-corrector) ----
        mu = (gap + tau * kappa) / mp1
        for r in range(m):
            w[r] = s[r] / yc[k + r]
        ok = _factor(H0, C, k, w, delta, H, L, dd, cst)
        tt = two / tau
        for i in range(n):
            c_x[i] = p[i] + tt * Qx[i]
        xiQxi = xQx / t2
        k_t = kappa / tau
        # predictor: [-p; b; h] and the affine direction
        for i in range(n):
            bx[i] = -p[i]
            bx2[i] = -rx[i]
        for r in range(kc):
            bc[r] = -rc[r]
        for r in range(m):
            bc[k + r] += s[r]
        _solve2(L, C, dd, bx, bh, bx2, bc, u1x, u1c, u2x, u2c, t, t2v, zero)
        denom = _dot(c_x, u1x, 0, n, zero) + _dot(bh, u1c, 0, kc, zero) - xiQxi - k_t
        if not (denom < 0):
            denom = -one
        # affine direction (eta = 1, d_s = -s z, d_k = -τκ)
        d_k = -tau * kappa
        dta = (-rtau - d_k / tau - _dot(c_x, u2x, 0, n, zero) - _dot(bh, u2c, 0, kc, zero)) / denom
        for r in range(kc):
            dyc[r] = u2c[r] + dta * u1c[r]
        for r in range(m):
            zr = yc[k + r]
            d_s[r] = -s[r] * zr
            dsa[r] = (d_s[r] - s[r] * dyc[k + r]) / zr
        dka = (d_k - kappa * dta) / tau
        alpha_a = _max_step(s, yc, dsa, dyc, tau, kappa, dta, dka, k, cst)
        mu_a = zero
        for r in range(m):
            mu_a += (s[r] + alpha_a * dsa[r]) * (yc[k + r] + alpha_a * dyc[k + r])
        mu_a = (mu_a + (tau + alpha_a * dta) * (kappa + alpha_a * dka)) / mp1
        ratio = mu_a / _fmax(mu, tiny)
        if ratio == ratio:
            ratio = min(max(ratio, zero), one)
        sigma = ratio * ratio * ratio
        eta = one - sigma
        smu = sigma * mu
        for r in range(m):
            d_s[r] = d_s[r] + smu - dsa[r] * dyc[k + r]
        d_k = -tau * kappa + smu - dta * dka
        # corrector: K⁻¹ [-η r_x; -η r_c - d_s/z]
        for i in range(n):
            bx[i] = -eta * rx[i]
        for r in range(kc):
            bc[r] = -eta * rc[r]
        for r in range(m):
            bc[k + r] -= d_s[r] / yc[k + r]
        _solve(L, C, dd, bx, bc, dx, dyc, t, zero)
        dtc = (-eta * rtau - d_k / tau - _dot(c_x, dx, 0, n, zero) - _dot(bh, dyc, 0, kc, zero)) / denom
        for i in range(n):
            dx[i] = dx[i] + dtc * u1x[i]
        for r in range(kc):
            dyc[r] = dyc[r] + dtc * u1c[r]
        for r in range(m):
            ds[r] = (d_s[r] - s[r] * dyc[k + r]) / yc[k + r]
        dkc = (d_k - kappa * dtc) / tau
        alpha = frac * _max_step(s, yc, ds, dyc, tau, kappa, dtc, dkc, k, cst)
        if not (ok and math.isfinite(alpha)):
            alpha = zero
        if alpha < small_thr:
            small += 1
        else:
            small = 0
        if ok and math.isfinite(alpha):
            for i in range(n):
                x[i] = x[i] + alpha * dx[i]
            for r in range(kc):
                yc[r] = yc[r] + alpha * dyc[r]
            for r in range(m):
                s[r] = s[r] + alpha * ds[r]
            tau = tau + alpha * dtc
            kappa = kappa + alpha * dkc
    tk[0] = tau
    tk[1] = kappa
    return status, iters, residual


@numba.njit(cache=True)
def _finite(a):  # pragma: no cover - compiled
    for v in a.ravel():
        if not math.isfinite(v):
            return False
    return True


@numba.njit(cache=True, fastmath=_FM)
def _prepare(Q, p, C, bh, k, reg, H0, cst):  # pragma: no cover - compiled
    """Finiteness, the static regularization and the constant part ``H0`` of one element.

    ``δ = reg · max(‖Q‖_max, ‖A‖²_max, ‖G‖²_max, 1)`` (:func:`.kkt.static_delta`) and
    ``H0 = Q + δI + AᵀA/δ`` (:func:`.kkt.kkt_constant`, both triangles); returns ``(finite, δ)``.
    """
    n = p.shape[0]
    kc = C.shape[0]
    zero = cst[_ZERO]
    finite = _finite(Q) and _finite(p) and _finite(C) and _finite(bh)
    qmax = zero
    for i in range(n):
        qmax = _fmax(qmax, _amax(Q[i], 0, n, zero))
    amax = zero
    for r in range(k):
        amax = _fmax(amax, _amax(C[r], 0, n, zero))
    gmax = zero
    for r in range(k, kc):
        gmax = _fmax(gmax, _amax(C[r], 0, n, zero))
    delta = reg * _fmax(_fmax(_fmax(qmax, gmax * gmax), amax * amax), cst[_ONE])
    for i in range(n):
        hi = H0[i]
        qi = Q[i]
        for j in range(n):
            hi[j] = qi[j]
        hi[i] += delta
    if k:
        inv = cst[_ONE] / delta
        for i in range(n):  # AᵀA/δ: rank-one updates of the upper triangle, then mirrored
            hi = H0[i, i:]
            for r in range(k):
                cr = C[r, i:]
                g = cr[0] * inv
                for j in range(n - i):
                    hi[j] += g * cr[j]
        for i in range(n):
            for j in range(i):
                H0[i, j] = H0[j, i]
    return finite, delta


@numba.njit(cache=True, fastmath=_FM)
def _solution_factor(C, k, H0, delta, yc, s, tau, status, cst, Lout, dout):  # pragma: no cover - compiled
    """The regularized KKT factorization at the returned solution, for the gradient.

    The weights are those :meth:`optlayers.solvers.qp.adjoint.KKTCache.add` forms from the returned
    slack ``s/τ`` and dual ``λ/τ``: ``W = max(s/τ, tiny) / max(λ/τ, tiny)``, and ``W = 1`` where
    either is not finite or the element failed (INFEASIBLE, UNBOUNDED, NONFINITE: NaN solution).
    ``Lout`` receives the *lower* factor (``LLᵀ = H``, as ``torch.linalg.cholesky``; the identity
    where the factorization failed) and ``dout`` the weights ``[1/δ; 1/(W + δ)]``; returns ``ok``.
    """
    n = H0.shape[0]
    kc = C.shape[0]
    m = kc - k
    one, tiny = cst[_ONE], cst[_TINY]
    bad = status == _NONFINITE or status == _INFEASIBLE or status == _UNBOUNDED
    w = np.empty(m, dtype=H0.dtype)
    for r in range(m):
        sl = s[r] / tau
        du = yc[k + r] / tau
        if bad or not (math.isfinite(sl) and math.isfinite(du)):
            w[r] = one
        else:
            w[r] = max(sl, tiny) / max(du, tiny)
    H = np.empty_like(H0)
    U = np.empty_like(H0)
    ok = _factor(H0, C, k, w, delta, H, U, dout, cst)
    for i in range(n):
        for j in range(n):
            Lout[i, j] = U[j, i] if j <= i else cst[_ZERO]
    return ok


@numba.njit(cache=True, fastmath=_FM)
def _solve_range(Q, p, C, bh, k, reg, cold, H0, delta, X, YC, S, TK, cst, max_iter, status, iters, resid,
                 want, Lout, dout, okout, lo, hi):  # pragma: no cover - compiled
    scratch = np.empty(Q.shape[1:] if H0.shape[0] == 0 else (0, 0), dtype=X.dtype)
    for b in range(lo, hi):
        H0b = H0[b] if H0.shape[0] else scratch
        iq = b if Q.shape[0] > 1 else 0
        ip = b if p.shape[0] > 1 else 0
        ic = b if C.shape[0] > 1 else 0
        ib = b if bh.shape[0] > 1 else 0
        finite, dl = _prepare(Q[iq], p[ip], C[ic], bh[ib], k, reg, H0b, cst)
        delta[b] = dl
        if not finite:
            status[b] = _NONFINITE
            iters[b] = 0
            resid[b] = cst[_INF]
            if want:
                okout[b] = _solution_factor(C[ic], k, H0b, dl, YC[b], S[b], TK[b, 0], _NONFINITE, cst, Lout[b],
                                            dout[b])
            continue
        st, it, r = _solve_one(Q[iq], p[ip], C[ic], bh[ib], H0b, dl, k, cold, X[b], YC[b], S[b], TK[b],
                               cst, max_iter)
        status[b] = st
        iters[b] = it
        resid[b] = r
        if want:
            okout[b] = _solution_factor(C[ic], k, H0b, dl, YC[b], S[b], TK[b, 0], st, cst, Lout[b], dout[b])


@numba.njit(cache=True, parallel=True, fastmath=_FM)
def _solve_parallel(Q, p, C, bh, k, reg, cold, H0, delta, X, YC, S, TK, cst, max_iter, status, iters, resid,
                    want, Lout, dout, okout, chunks):  # pragma: no cover - compiled
    B = X.shape[0]
    for c in numba.prange(chunks):
        _solve_range(Q, p, C, bh, k, reg, cold, H0, delta, X, YC, S, TK, cst, max_iter, status, iters, resid,
                     want, Lout, dout, okout, c * B // chunks, (c + 1) * B // chunks)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().contiguous().numpy())


def qp_ipm_numba(Q: torch.Tensor, p: torch.Tensor, C: torch.Tensor, bh: torch.Tensor, k: int, reg: float,
                 B: int, init: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None, *,
                 max_iter: int, rtol: float, floor: float, eps_inf: float, step_fraction: float,
                 factor: bool = False, constant: bool = True) -> tuple[torch.Tensor, ...]:
    """Run the interior point on every element (see the module docstring).

    Args:
        Q, p, C, bh: ``(B|1, n, n)``, ``(B|1, n)``, ``(B|1, k+m, n)`` (``C = [A; G]``) and
            ``(B|1, k+m)`` (``[b; h]``); shared data (leading dimension 1) is read in place, never
            copied per element.
        k: Number of equality rows. reg: Relative static regularization.
        B: Batch size.
        init: ``(x, yc, s, τ, κ)`` warm start of shapes ``(B, n)``, ``(B, k+m)``, ``(B, m)``, ``(B,)``,
            ``(B,)``, or None for the cold start.
        factor: Also return the KKT factorization at the returned solution (for the gradient).
        constant: Return ``H0``; without it each element's ``H0`` is formed in a scratch array
            and an empty ``(0, n, n)`` tensor stands in its place.

    Returns:
        ``(x, yc, s, τ, κ, status, iterations, residual, H0, delta)``: the final point of the
        embedding (not yet divided by τ), the per-element outcome (elements with non-finite data
        are not solved: NONFINITE), and the constant part ``H0 = Q + δI + AᵀA/δ`` ``(B, n, n)`` with
        the static regularization ``δ`` ``(B, 1)``, which the gradient's factorization reuses; with
        ``factor``, then also ``(L (B, n, n), d (B, k+m), ok (B,))`` of :func:`_solution_factor`.
    """
    n = p.shape[-1]
    kc = bh.shape[-1]
    m = kc - k
    Qn, pn, Cn, bhn = _np(Q), _np(p), _np(C), _np(bh)
    npdt = Qn.dtype
    if init is None:
        X = np.zeros((B, n), dtype=npdt)
        YC = np.zeros((B, kc), dtype=npdt)
        S = np.zeros((B, m), dtype=npdt)
        TK = np.ones((B, 2), dtype=npdt)
    else:
        x0, y0, s0, t0, k0 = init
        X = np.array(_np(x0.expand(B, n)), dtype=npdt, order="C", copy=True)
        YC = np.array(_np(y0.expand(B, kc)), dtype=npdt, order="C", copy=True)
        S = np.array(_np(s0.expand(B, m)), dtype=npdt, order="C", copy=True)
        TK = np.ascontiguousarray(np.stack([_np(t0.expand(B)), _np(k0.expand(B))], -1), dtype=npdt)
    cst = constants(npdt, m, rtol, floor, eps_inf, step_fraction)
    status = np.zeros(B, dtype=np.int64)
    iters = np.zeros(B, dtype=np.int64)
    resid = np.zeros(B, dtype=npdt)
    H0 = np.empty((B if constant else 0, n, n), dtype=npdt)
    delta = np.empty(B, dtype=npdt)
    cold = init is None
    regd = npdt.type(reg)
    nb = B if factor else 0
    Lout = np.empty((nb, n, n), dtype=npdt)
    dout = np.empty((nb, kc), dtype=npdt)
    okout = np.zeros(nb, dtype=np.bool_)
    if B:
        threads = parallel_threads() if B > 1 else 1
        if threads > 1:
            parallel_launch(_solve_parallel, threads, Qn, pn, Cn, bhn, k, regd, cold, H0, delta, X, YC, S, TK, cst,
                            max_iter, status, iters, resid, factor, Lout, dout, okout, min(B, 4 * threads))
        else:
            _solve_range(Qn, pn, Cn, bhn, k, regd, cold, H0, delta, X, YC, S, TK, cst, max_iter, status, iters, resid,
                         factor, Lout, dout, okout, 0, B)
    tk = torch.from_numpy(TK)
    out: tuple[torch.Tensor, ...] = (torch.from_numpy(X), torch.from_numpy(YC), torch.from_numpy(S), tk[:, 0], tk[:, 1],
           torch.from_numpy(status), torch.from_numpy(iters), torch.from_numpy(resid),
           torch.from_numpy(H0), torch.from_numpy(delta).unsqueeze(-1))
    if factor:
        out = out + (torch.from_numpy(Lout), torch.from_numpy(dout), torch.from_numpy(okout))
    return out

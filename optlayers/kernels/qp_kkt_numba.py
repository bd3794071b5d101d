"""The regularized KKT solve of the QP gradient, compiled (Numba; the interior point's kernel is
:mod:`optlayers.kernels.qp_ipm_numba`).

With the factorization ``L Lᵀ = Q + δI + Cᵀ diag(d) C`` that the interior-point kernel hands over
at the solution, the gradient's solves ``dx = (LLᵀ)⁻¹ (rx + Cᵀ(d∘rc))``, ``dc = d∘(C dx − rc)`` run
one element at a time with its factor in cache, instead of as batched triangular solves. Its
specification is :func:`optlayers.solvers.qp.kkt.solve_regularized`; the tests compare the two.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .qp_ipm_numba import _FM, _np

__all__ = ["kkt_solve_numba", "kkt_refine_numba"]


@numba.njit(cache=True, fastmath=_FM)
def _solve_one(Lb, Cb, db, rx, rc, ox, oc, t, zero):  # pragma: no cover - compiled
    """One right-hand side: ``ox = (LLᵀ)⁻¹ (rx + Cᵀ(d∘rc))``, ``oc = d∘(C ox − rc)`` (``t`` scratch)."""
    n = Lb.shape[0]
    kc = Cb.shape[0]
    for i in range(n):
        t[i] = rx[i]
    for r in range(kc):
        g = db[r] * rc[r]
        cr = Cb[r]
        for j in range(n):
            t[j] += g * cr[j]
    for i in range(n):  # L y = t (row dot products)
        li = Lb[i]
        acc = t[i]
        for j in range(i):
            acc -= li[j] * t[j]
        t[i] = acc / li[i]
    for i in range(n - 1, -1, -1):  # Lᵀ x = y (axpy with the rows of L)
        li = Lb[i]
        xi = t[i] / li[i]
        t[i] = xi
        for j in range(i):
            t[j] -= xi * li[j]
    for i in range(n):
        ox[i] = t[i]
    for r in range(kc):
        cr = Cb[r]
        acc = zero
        for j in range(n):
            acc += cr[j] * t[j]
        oc[r] = db[r] * (acc - rc[r])


@numba.njit(cache=True, fastmath=_FM)
def _kkt_solve_range(L, C, d, RX, RC, OX, OC, t, zero, lo, hi):  # pragma: no cover - compiled
    n = L.shape[1]
    kc = C.shape[1]
    V = RX.shape[2]
    rx = np.empty(n, dtype=L.dtype)
    rc = np.empty(kc, dtype=L.dtype)
    ox = np.empty(n, dtype=L.dtype)
    oc = np.empty(kc, dtype=L.dtype)
    for b in range(lo, hi):
        Cb = C[b if C.shape[0] > 1 else 0]
        for v in range(V):
            for i in range(n):
                rx[i] = RX[b, i, v]
            for r in range(kc):
                rc[r] = RC[b, r, v]
            _solve_one(L[b], Cb, d[b], rx, rc, ox, oc, t, zero)
            for i in range(n):
                OX[b, i, v] = ox[i]
            for r in range(kc):
                OC[b, r, v] = oc[r]


@numba.njit(cache=True, fastmath=_FM)
def _kkt_refine_range(L, C, d, Q, c, rr, g, k, cst, refine, U, rel, ok):  # pragma: no cover - compiled
    """Solve ``Kᵀu = g`` per element: regularized solves refined against the exact operator."""
    B, N = g.shape
    n = L.shape[1]
    kc = C.shape[1]
    zero, rtol, slack = cst[0], cst[1], cst[2]
    res = np.empty(N, dtype=g.dtype)
    du = np.empty(N, dtype=g.dtype)
    w = np.empty(kc, dtype=g.dtype)
    t = np.empty(n, dtype=g.dtype)
    for b in range(B):
        Cb = C[b if C.shape[0] > 1 else 0]
        Qb = Q[b if Q.shape[0] > 1 else 0]
        gb = g[b]
        u = U[b]
        gn = zero
        for i in range(N):
            gn += gb[i] * gb[i]
            u[i] = zero
            res[i] = gb[i]
        gn = math.sqrt(gn)
        tol = rtol * gn + slack * gn
        rn = gn
        for _ in range(refine + 1):
            if rn <= tol:
                break
            _solve_one(L[b], Cb, d[b], res[:n], res[n:], du[:n], du[n:], t, zero)
            for i in range(N):
                u[i] += du[i]
            # res = g − Kᵀu, Kᵀu = (Qᵀu_x + Cᵀ[u_ν; c∘u_λ], C u_x + [0; r∘u_λ])
            for r in range(kc):
                w[r] = u[n + r] if r < k else c[b, r - k] * u[n + r]
            for i in range(n):
                res[i] = gb[i]
            for j in range(n):
                a = u[j]
                qj = Qb[j]
                for i in range(n):
                    res[i] -= a * qj[i]
            for r in range(kc):
                a = w[r]
                cr = Cb[r]
                for i in range(n):
                    res[i] -= a * cr[i]
            for r in range(kc):
                cr = Cb[r]
                acc = zero
                for j in range(n):
                    acc += cr[j] * u[j]
                if r >= k:
                    acc += rr[b, r - k] * u[n + r]
                res[n + r] = gb[n + r] - acc
            rn = zero
            for i in range(N):
                rn += res[i] * res[i]
            rn = math.sqrt(rn)
        good = rn <= tol
        for i in range(N):
            good = good and math.isfinite(u[i])
        ok[b] = good
        rel[b] = rn / gn if gn > zero else rn


def kkt_solve_numba(L: torch.Tensor, C: torch.Tensor, d: torch.Tensor, rx: torch.Tensor,
                    rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The regularized KKT solve of :func:`optlayers.solvers.qp.kkt.solve_regularized`, compiled.

    ``dx = (LLᵀ)⁻¹ (rx + Cᵀ(d∘rc))`` and ``dc = d∘(C dx − rc)`` for every element and right-hand
    side: ``L (B, n, n)`` lower, ``C (B|1, k+m, n)``, ``d (B, k+m)``, ``rx (B, n, V)``,
    ``rc (B, k+m, V)`` (CPU, one dtype). One pass per element with its factor in cache, in place
    of the batched triangular solves and products (the gradient's solves with the factorization
    the interior-point kernel handed over). No gradients.
    """
    Ln, Cn, dn, rxn, rcn = _np(L), _np(C), _np(d), _np(rx), _np(rc)
    B, n, V = rxn.shape
    OX = np.empty((B, n, V), dtype=Ln.dtype)
    OC = np.empty(rcn.shape, dtype=Ln.dtype)
    if B and V:
        _kkt_solve_range(Ln, Cn, dn, rxn, rcn, OX, OC, np.empty(n, dtype=Ln.dtype), Ln.dtype.type(0), 0, B)
    return torch.from_numpy(OX), torch.from_numpy(OC)


def kkt_refine_numba(L: torch.Tensor, C: torch.Tensor, d: torch.Tensor, Q: torch.Tensor, c: torch.Tensor,
                     rr: torch.Tensor, g: torch.Tensor, k: int, rtol: float,
                     refine: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The QP gradient's adjoint solve ``(∂_z F)ᵀ u = g`` per element, with its refinement, compiled.

    The regularized solve with the factorization ``L`` of :func:`kkt_solve_numba`, refined (at most
    ``refine`` more solves) against the exact operator

    .. math::

        (\partial_z F)^\top u = \big(Q^\top u_x + C^\top [u_\nu; c \circ u_\lambda],\ \
        C u_x + [0; r \circ u_\lambda]\big), \qquad C = [A; G],

    until ``‖g − (∂_z F)ᵀu‖ ≤ rtol ‖g‖`` (the test of :class:`optlayers.solvers.qp.KKTSolve`, with
    the same round-off slack as :func:`optlayers.implicit.linear_solvers._base.finish`). One pass per
    element, its factor and data in cache, instead of batched solves and products per refinement
    step. Its specification is the Cholesky path of ``KKTSolve`` with the operator of
    :mod:`optlayers.solvers.qp.explicit_vjp`; the tests compare the two.

    Args:
        L: ``(B, n, n)`` lower factor; C: ``(B|1, k+m, n)``; d: ``(B, k+m)``; Q: ``(B|1, n, n)``.
        c, rr: ``(B, m)``: ``λ/λ̂`` and ``(Gx − h)/λ̂`` at the solution.
        g: ``(B, n+k+m)`` right-hand sides. k: Equality rows.
        rtol: Relative residual tolerance. refine: Most refinement steps.

    Returns:
        ``u (B, n+k+m)``, ``converged (B,)`` and the relative residual ``(B,)``. No gradients.
    """
    Ln, Cn, dn, Qn, cn, rn, gn = (_np(t) for t in (L, C, d, Q, c, rr, g))
    B, N = gn.shape
    cst = np.array([0.0, rtol * (1 + 1e-6), 10 * np.finfo(Ln.dtype).eps], dtype=Ln.dtype)
    U = np.empty((B, N), dtype=Ln.dtype)
    rel = np.empty(B, dtype=Ln.dtype)
    ok = np.zeros(B, dtype=np.bool_)
    if B:
        _kkt_refine_range(Ln, Cn, dn, Qn, cn, rn, gn, k, cst, refine, U, rel, ok)
    return torch.from_numpy(U), torch.from_numpy(ok), torch.from_numpy(rel)

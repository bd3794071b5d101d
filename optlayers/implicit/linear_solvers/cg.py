"""Conjugate gradients for batches of symmetric positive definite systems."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result, Status
from ._base import (
    KrylovSolver,
    LinearOperator,
    Monitor,
    confirm,
    default_max_iter,
    dot,
    prepare,
)

__all__ = ["CG"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(KrylovSolver):
    r"""Conjugate gradients (Hestenes–Stiefel) for symmetric positive definite ``A``.

    Solves ``(A + ridge I) x = b`` for each batch element by minimizing the energy norm of the
    error over the Krylov spaces ``x₀ + span{r₀, A r₀, …, A^{k-1} r₀}``:

    .. math::
        α_k = \frac{r_kᵀ r_k}{p_kᵀ A p_k},\quad x_{k+1} = x_k + α_k p_k,\quad
        r_{k+1} = r_k − α_k A p_k,\quad p_{k+1} = r_{k+1} + \frac{r_{k+1}ᵀ r_{k+1}}{r_kᵀ r_k} p_k.

    Convergence is tested per element, ``‖A x − b‖ ≤ max(atol, rtol ‖b‖)``; converged elements
    are frozen while the others continue. When the recurrence claims convergence the true
    residual is checked, and the iteration restarts from ``x`` if round-off made them differ.

    Failures are reported, never hidden: a curvature ``pᵀ A p ≤ ε ‖p‖² λ̂`` (``λ̂`` the largest
    Rayleigh quotient seen) stops the element with ``BREAKDOWN`` (``A`` is not positive
    definite); no 1% improvement of the best residual during ``max(50, min(2n, 1000))``
    iterations gives ``STAGNATION``. An element that stops unconverged returns its best iterate
    (smallest true residual). ``A`` is assumed symmetric (the tag is not checked).

    Args:
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance.
        max_iter: Iteration limit; None means ``max(10 n, 50)``.
        ridge: Tikhonov shift added to ``A``.
        callback: Called after every iteration with ``(k, ‖r‖)``, ``‖r‖`` of shape ``(B,)``.

    Returns (from ``__call__``):
        :class:`~optlayers.Result` with ``solution`` ``(B, n)`` and per-element flags.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import CG, LinearOperator
        >>> A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 2
        >>> op = LinearOperator.from_dense(A, positive_definite=True)
        >>> CG()(op, torch.ones(2, 3, dtype=torch.float64)).solution[0]
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)

    References:
        Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems", 1952.
    """

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol, atol=self.atol)
        A, b, x, tol = prep.op, prep.b, prep.x, prep.tol
        max_iter = default_max_iter(A.n, self.max_iter)
        eps = torch.finfo(b.dtype).eps

        r = b - A.matvec(x)
        rs = dot(r, r)
        rnorm = rs.sqrt()
        active = ~prep.done & ~(rnorm <= tol)
        p = r
        mon = Monitor(rnorm, A.n, x)
        scale = torch.zeros_like(rnorm)
        k = 0
        while k < max_iter and bool(active.any()):
            Ap = A.matvec(p)
            pAp, pp = dot(p, Ap), dot(p, p)
            ray = pAp / pp.clamp_min(torch.finfo(b.dtype).tiny)
            scale = torch.where(active & torch.isfinite(ray), torch.maximum(scale, ray.abs()), scale)
            active = active & ~mon.fail(active & ~(pAp > eps * pp * scale), Status.BREAKDOWN)  # also NaN
            alpha = rs / torch.where(active, pAp, torch.ones_like(pAp))
            step = active.unsqueeze(-1)
            x = torch.where(step, x + alpha.unsqueeze(-1) * p, x)
            r = torch.where(step, r - alpha.unsqueeze(-1) * Ap, r)
            rs_new = torch.where(active, dot(r, r), rs)
            rnorm = rs_new.sqrt()
            mon.count_step(active)
            k += 1

            restart = torch.zeros_like(active)
            checked = confirm(A, b, x, active & (rnorm <= tol), tol)
            if checked is not None:  # round-off drift: restart from the true residual
                ok, r_true, tnorm = checked
                restart = active & (rnorm <= tol) & ~ok
                active = active & ~ok
                r = torch.where(restart.unsqueeze(-1), r_true, r)
                rs_new = torch.where(restart, tnorm.square(), rs_new)
                rnorm = torch.where(restart, tnorm, rnorm)

            beta = torch.where(active & ~restart, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                               torch.zeros_like(rs))
            p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
            rs = rs_new
            active = mon.track(rnorm, active, x)
            if self.callback is not None:
                self.callback(k, rnorm)
        return mon.result(prep, x, active)

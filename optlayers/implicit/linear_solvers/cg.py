"""Conjugate gradients for batches of symmetric positive definite systems."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result, Status
from ._base import (
    Callback,
    LinearOperator,
    LinearSolver,
    check_fields,
    conclude,
    default_max_iter,
    dot,
    keep_best,
    prepare,
    stall_update,
    stall_window,
)

__all__ = ["CG"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(LinearSolver):
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

    rtol: float | None = None
    atol: float = 0.0
    max_iter: int | None = None
    ridge: float = 0.0
    callback: Callback | None = None

    def __post_init__(self) -> None:
        check_fields(self, rtol=self.rtol, atol=self.atol, max_iter=self.max_iter, ridge=self.ridge)

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol, atol=self.atol)
        A, b, x, tol = prep.op, prep.b, prep.x, prep.tol
        max_iter = default_max_iter(A.n, self.max_iter)
        eps = torch.finfo(b.dtype).eps
        window = stall_window(A.n)

        r = b - A.matvec(x)
        rs = dot(r, r)
        rnorm = rs.sqrt()
        active = ~prep.done & ~(rnorm <= tol)
        p = r
        flag = torch.zeros_like(active, dtype=torch.int64)
        iters = torch.zeros_like(flag)
        best, count = rnorm, torch.zeros_like(flag)
        scale = torch.zeros_like(rnorm)
        x_best, r_best = x, rnorm
        k = 0
        while k < max_iter and bool(active.any()):
            Ap = A.matvec(p)
            pAp, pp = dot(p, Ap), dot(p, p)
            ray = pAp / pp.clamp_min(torch.finfo(b.dtype).tiny)
            scale = torch.where(active & torch.isfinite(ray), torch.maximum(scale, ray.abs()), scale)
            broke = active & ~(pAp > eps * pp * scale)  # also catches NaN
            flag = torch.where(broke, torch.full_like(flag, int(Status.BREAKDOWN)), flag)
            active = active & ~broke
            alpha = rs / torch.where(active, pAp, torch.ones_like(pAp))
            step = active.unsqueeze(-1)
            x = torch.where(step, x + alpha.unsqueeze(-1) * p, x)
            r = torch.where(step, r - alpha.unsqueeze(-1) * Ap, r)
            rs_new = torch.where(active, dot(r, r), rs)
            rnorm = rs_new.sqrt()
            iters = iters + active.to(iters.dtype)
            k += 1

            restart = torch.zeros_like(active)
            claimed = active & (rnorm <= tol)
            if bool(claimed.any()):  # confirm with the true residual (round-off drift)
                r_true = b - A.matvec(x)
                tnorm = torch.linalg.vector_norm(r_true, dim=-1)
                ok = claimed & (tnorm <= tol)
                active = active & ~ok
                restart = claimed & ~ok
                r = torch.where(restart.unsqueeze(-1), r_true, r)
                rs_new = torch.where(restart, tnorm.square(), rs_new)
                rnorm = torch.where(restart, tnorm, rnorm)

            beta = torch.where(active & ~restart, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                               torch.zeros_like(rs))
            p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
            rs = rs_new
            better = active & (rnorm < r_best)
            x_best = torch.where(better.unsqueeze(-1), x, x_best)
            r_best = torch.where(better, rnorm, r_best)
            best, count = stall_update(rnorm, best, count, active)
            stalled = active & (count >= window)
            flag = torch.where(stalled, torch.full_like(flag, int(Status.STAGNATION)), flag)
            active = active & ~stalled
            if self.callback is not None:
                self.callback(k, rnorm)
        x = keep_best(A, b, x, x_best, (flag != 0) | active)
        return conclude(prep, x, iters, flag)

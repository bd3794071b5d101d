"""CG on the normal equations (CGLS / CGNR) for batches of general systems."""

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

__all__ = ["NormalCG"]


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormalCG(KrylovSolver):
    r"""Conjugate gradients on the normal equations ``AᵀA x = Aᵀb`` (CGLS form).

    Works for any square ``A`` (nonsymmetric, indefinite) at the price of squaring the
    condition number. The iterates minimize ``‖A x − b‖`` over
    ``x₀ + \mathcal K_k(AᵀA, Aᵀ r₀)``, so the residual decreases monotonically:

    .. math::
        s = Aᵀ r,\ q = A p,\ α = \frac{‖s‖^2}{‖q‖^2},\ x ← x + α p,\ r ← r − α q,\
        p ← s_{new} + \frac{‖s_{new}‖^2}{‖s‖^2} p.

    Convergence is tested on the residual of the original system, ``‖A x − b‖ ≤ max(atol,
    rtol ‖b‖)``, confirmed with the true residual (restarting from ``x`` if they differ).

    Failures: ``‖Aᵀ r‖ ≤ n ε ‖A‖ ‖r‖`` while ``r`` is above tolerance means ``x`` solves the
    least-squares problem but not the system (``b`` is outside the range of a singular
    ``A``): ``SINGULAR``, never a silent "solution". ``‖A p‖ = 0`` gives ``BREAKDOWN``; no 1%
    improvement during ``max(50, min(2n, 1000))`` iterations gives ``STAGNATION``.

    Args:
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance.
        max_iter: Iteration limit; None means ``max(10 n, 50)``.
        ridge: Tikhonov shift added to ``A`` (before forming the normal equations).
        callback: Called after every iteration with ``(k, ‖r‖)``, shape ``(B,)``.

    Raises (from ``__call__``):
        ValueError: The operator has no ``rmatvec`` and is not tagged symmetric.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import NormalCG, LinearOperator
        >>> A = torch.tensor([[[2.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
        >>> b = torch.ones(1, 2, dtype=torch.float64)
        >>> result = NormalCG()(LinearOperator.from_dense(A), b)
        >>> bool(result.converged.all()), torch.allclose(result.solution, torch.linalg.solve(A, b))
        (True, True)

    References:
        Hestenes & Stiefel (1952), §10; Björck, "Numerical Methods for Least Squares Problems",
        SIAM, 1996, §7.4 (CGLS).
    """

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        if op.rmatvec is None and not op.symmetric:
            raise ValueError("NormalCG needs the transpose: give the operator an rmatvec or tag it "
                             "symmetric, or use GMRES / BiCGStab, which need no transpose")
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol, atol=self.atol)
        A, b, x, tol = prep.op, prep.b, prep.x, prep.tol
        At = A.T
        n = A.n
        max_iter = default_max_iter(n, self.max_iter)
        eps = torch.finfo(b.dtype).eps

        r = b - A.matvec(x)
        s = At.matvec(r)
        gamma = dot(s, s)
        rnorm = _norm(r)
        active = ~prep.done & ~(rnorm <= tol)
        p = s
        mon = Monitor(rnorm, n)
        anorm = torch.zeros_like(rnorm)
        one = torch.ones_like(rnorm)
        k = 0
        while k < max_iter and bool(active.any()):
            q = A.matvec(p)
            qq, pp = dot(q, q), dot(p, p)
            est = (qq / pp.clamp_min(torch.finfo(b.dtype).tiny)).sqrt()
            anorm = torch.where(active & torch.isfinite(est), torch.maximum(anorm, est), anorm)
            active = active & ~mon.fail(active & ~(qq > 0), Status.BREAKDOWN)  # also catches NaN
            alpha = gamma / torch.where(active, qq, one)
            step = active.unsqueeze(-1)
            x = torch.where(step, x + alpha.unsqueeze(-1) * p, x)
            r = torch.where(step, r - alpha.unsqueeze(-1) * q, r)
            rnorm = torch.where(active, _norm(r), rnorm)
            mon.count_step(active)
            k += 1

            restart = torch.zeros_like(active)
            checked = confirm(A, b, x, active & (rnorm <= tol), tol)
            if checked is not None:  # round-off drift: restart from the true residual
                ok, r_true, tnorm = checked
                restart = active & (rnorm <= tol) & ~ok
                active = active & ~ok
                r = torch.where(restart.unsqueeze(-1), r_true, r)
                rnorm = torch.where(restart, tnorm, rnorm)
            s = At.matvec(r)
            gamma_new = dot(s, s)
            active = active & ~mon.fail(active & (gamma_new.sqrt() <= n * eps * anorm * rnorm), Status.SINGULAR)
            beta = torch.where(active & ~restart, gamma_new / torch.where(active, gamma, one),
                               torch.zeros_like(gamma))
            p = torch.where(active.unsqueeze(-1), s + beta.unsqueeze(-1) * p, p)
            gamma = torch.where(active, gamma_new, gamma)
            active = mon.track(rnorm, active)
            if self.callback is not None:
                self.callback(k, rnorm)
        return mon.result(prep, x, active)

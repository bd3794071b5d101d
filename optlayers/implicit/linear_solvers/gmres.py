"""Restarted GMRES for batches of general (nonsymmetric) systems."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result, Status
from ._base import (
    KrylovSolver,
    LinearOperator,
    Monitor,
    default_max_iter,
    dot,
    prepare,
)

__all__ = ["GMRES"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMRES(KrylovSolver):
    r"""Restarted GMRES(m) (Saad–Schultz) for general square ``A``.

    Each cycle builds an orthonormal Krylov basis ``V_{k+1}`` with the Arnoldi process
    (modified Gram–Schmidt), ``A V_k = V_{k+1} H̄_k``, and picks

    .. math::
        x_k = x_0 + V_k y_k,\qquad y_k = \arg\min_y ‖β e_1 − H̄_k y‖_2,\quad β = ‖r_0‖,

    reducing ``H̄_k`` to triangular form with Givens rotations (so ``|g_{k+1}|`` is the
    residual norm at no extra cost). After ``m = min(restart, n)`` steps the cycle restarts
    from the current ``x`` with the true residual. Elements converge, stall or break down
    independently; those done mid-cycle stop extending their basis.

    Failures, never silent (convergence is decided on the true residual): a triangular pivot
    ``|r_jj| ≤ n ε ‖H‖``, or an invariant Krylov space (``h_{j+1,j} ≤ √ε ‖H‖``) whose last
    pivot is noise as well, means ``A`` is singular on it (``b`` is not in the range):
    ``SINGULAR``, and ``x`` is the least-squares iterate before that step. A cycle that
    increases the true residual (round-off on an ill-conditioned system) is discarded and
    gives ``STAGNATION``, as does no 1% improvement during ``max(50, min(2n, 1000))`` steps.

    Args:
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance.
        max_iter: Limit on the total Arnoldi steps; None means ``max(10 n, 50)``.
        restart: Krylov dimension per cycle, clipped to ``n``.
        ridge: Tikhonov shift added to ``A``.
        callback: Called after every Arnoldi step with ``(k, |g_{k+1}|)``, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import GMRES, LinearOperator
        >>> A = torch.tensor([[[2.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
        >>> b = torch.ones(1, 2, dtype=torch.float64)
        >>> result = GMRES()(LinearOperator.from_dense(A), b)
        >>> bool(result.converged.all()), torch.allclose(result.solution, torch.linalg.solve(A, b))
        (True, True)

    References:
        Saad & Schultz, "GMRES: a generalized minimal residual algorithm for solving
        nonsymmetric linear systems", SIAM J. Sci. Stat. Comput., 1986.
    """

    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.restart, int) or isinstance(self.restart, bool) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be a positive int, got {self.restart!r}")

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol, atol=self.atol)
        A, b, x, tol = prep.op, prep.b, prep.x, prep.tol
        n = A.n
        max_iter = default_max_iter(n, self.max_iter)
        m = min(self.restart, n)
        eps = torch.finfo(b.dtype).eps

        r = b - A.matvec(x)
        rnorm = torch.linalg.vector_norm(r, dim=-1)
        active = ~prep.done & ~(rnorm <= tol)
        mon = Monitor(rnorm, n)
        one, zero = torch.ones_like(rnorm), torch.zeros_like(rnorm)
        k = 0
        while k < max_iter and bool(active.any()):
            x_new, mon.flag, steps, k = self._cycle(A, r, rnorm, x, tol, active, mon.flag, mon.iters, m,
                                                    min(m, max_iter - k), k, eps, one, zero)
            mon.count_step(active, steps)
            r_new = b - A.matvec(x_new)
            rnorm_new = torch.linalg.vector_norm(r_new, dim=-1)
            # GMRES never increases the residual: a cycle that did was wrecked by round-off (an
            # ill-conditioned or numerically singular system); keep the previous iterate.
            worse = active & ~(rnorm_new <= rnorm * (1 + 1e-3) + tol)
            mon.fail(worse, Status.STAGNATION)
            keep = worse.unsqueeze(-1)
            x = torch.where(keep, x, x_new)
            r = torch.where(keep, r, r_new)
            rnorm = torch.where(worse, rnorm, rnorm_new)
            active = active & (mon.flag == 0) & ~(rnorm <= tol)
            active = mon.track(rnorm, active, steps=steps)
        return mon.result(prep, x, active)

    def _cycle(self, A: LinearOperator, r: torch.Tensor, rnorm: torch.Tensor, x: torch.Tensor,
               tol: torch.Tensor, active: torch.Tensor, flag: torch.Tensor, iters: torch.Tensor,
               m: int, steps: int, k: int, eps: float, one: torch.Tensor, zero: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One Arnoldi cycle of at most ``steps`` steps; returns ``(x, flag, steps_used, k)``."""
        n = A.n
        V = [torch.where(active.unsqueeze(-1), r / torch.where(active, rnorm, one).unsqueeze(-1),
                         torch.zeros_like(r))]
        g = [torch.where(active, rnorm, zero)]
        cols: list[list[torch.Tensor]] = []
        rots: list[tuple[torch.Tensor, torch.Tensor]] = []
        hnorm = zero
        inner = active
        used = torch.zeros_like(iters)
        for j in range(steps):
            if not bool(inner.any()):
                break
            w = A.matvec(V[j])
            h = []
            for i in range(j + 1):  # modified Gram–Schmidt
                hij = dot(V[i], w)
                w = w - hij.unsqueeze(-1) * V[i]
                h.append(hij)
            hnext = torch.linalg.vector_norm(w, dim=-1)
            hnorm = torch.maximum(hnorm, torch.where(inner, torch.stack([*h, hnext]).abs().amax(0),
                                                     zero))
            for i, (c, s) in enumerate(rots):  # previous rotations
                h[i], h[i + 1] = c * h[i] + s * h[i + 1], -s * h[i] + c * h[i + 1]
            denom = torch.hypot(h[j], hnext)
            # A vanishing pivot; or an invariant Krylov space (h_{j+1,j} ≈ 0) whose last pivot is
            # noise too (sin θ_j = h_{j+1,j} / denom not ≪ 1): A is singular on it.
            exhausted = hnext <= eps**0.5 * hnorm
            singular = inner & (~(denom > n * eps * hnorm) | (exhausted & (hnext > 0.5 * denom)))
            flag = torch.where(singular, torch.full_like(flag, int(Status.SINGULAR)), flag)
            use = inner & ~singular
            safe = torch.where(use, denom, one)
            c, s = torch.where(use, h[j] / safe, one), torch.where(use, hnext / safe, zero)
            rots.append((c, s))
            col = [torch.where(use, hi, zero) for hi in h[:j]] + [torch.where(use, denom, one)]
            cols.append(col)
            gj = torch.where(use, g[j], zero)
            g[j] = c * gj
            g.append(-s * gj)
            res = g[j + 1].abs()
            # Stop extending where converged, or where the next basis vector is not trustworthy.
            inner = use & ~(res <= tol) & (hnext > n * eps * hnorm)
            V.append(torch.where(inner.unsqueeze(-1), w / torch.where(inner, hnext, one).unsqueeze(-1),
                                 torch.zeros_like(w)))
            used = used + use.to(used.dtype)
            k += 1
            if self.callback is not None:
                self.callback(k, torch.where(use, res, rnorm))
        J = len(cols)
        if J == 0:
            return x, flag, used, k
        R = torch.stack([torch.stack(col + [zero] * (J - 1 - j), dim=-1)
                         for j, col in enumerate(cols)], dim=-1)  # (B, J, J) upper triangular
        rhs = torch.stack(g[:J], dim=-1).unsqueeze(-1)
        y = torch.linalg.solve_triangular(R, rhs, upper=True)
        x_new = x + (torch.stack(V[:J], dim=-1) @ y).squeeze(-1)
        ok = active & torch.isfinite(x_new).all(dim=-1)
        broke = active & ~ok
        flag = torch.where(broke & (flag == 0), torch.full_like(flag, int(Status.BREAKDOWN)), flag)
        return torch.where(ok.unsqueeze(-1), x_new, x), flag, used, k

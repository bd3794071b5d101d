"""Automatic choice of the linear solver from the operator's size and structure tags."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result, Status
from ._base import LinearOperator, LinearSolver, check_fields
from .cg import CG
from .dense import Dense
from .gmres import GMRES
from .minres import MINRES

__all__ = ["Auto"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Auto(LinearSolver):
    r"""Pick a solver from the size and the tags of the operator.

    * ``n <= dense_max_n``: :class:`Dense` (``"auto"``: Cholesky if tagged symmetric, else LU)
      on the materialized matrix (``n`` vmapped matvecs, ``B n²`` memory).
    * else, ``op.positive_definite``: :class:`CG`; ``op.symmetric``: :class:`MINRES`;
      otherwise :class:`GMRES`.

    When CG or MINRES stop with ``BREAKDOWN`` or ``STAGNATION`` (e.g. a wrong
    ``positive_definite`` tag), those elements are solved again by GMRES, warm-started from
    where they stopped; ``iterations`` then counts both runs. All solve
    ``(A + ridge I) x = b`` with the test ``‖A x − b‖ ≤ max(atol, rtol ‖b‖)``.

    Args:
        dense_max_n: Largest ``n`` solved densely (0: always matrix-free).
        ridge: Tikhonov shift added to ``A``.
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance.
        max_iter: Iteration limit of the iterative solvers; None means ``max(10 n, 50)``.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import Auto, LinearOperator
        >>> A = torch.tensor([[[2.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
        >>> Auto()(LinearOperator.from_dense(A), torch.ones(1, 2, dtype=torch.float64)).solution
        tensor([[0., 1.]], dtype=torch.float64)
    """

    dense_max_n: int = 500
    ridge: float = 0.0
    rtol: float | None = None
    atol: float = 0.0
    max_iter: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, rtol=self.rtol, atol=self.atol, max_iter=self.max_iter, ridge=self.ridge)
        if (not isinstance(self.dense_max_n, int) or isinstance(self.dense_max_n, bool)
                or self.dense_max_n < 0):
            raise ValueError(f"Auto: dense_max_n must be an int >= 0, got {self.dense_max_n!r}")

    def select(self, op: LinearOperator) -> LinearSolver:
        """The solver :meth:`__call__` uses first for ``op``."""
        rtol, atol, ridge, max_iter = self.rtol, self.atol, self.ridge, self.max_iter
        if op.n <= self.dense_max_n:
            return Dense(rtol=rtol, atol=atol, ridge=ridge)
        if op.positive_definite:
            return CG(rtol=rtol, atol=atol, max_iter=max_iter, ridge=ridge)
        if op.symmetric:
            return MINRES(rtol=rtol, atol=atol, max_iter=max_iter, ridge=ridge)
        return GMRES(rtol=rtol, atol=atol, max_iter=max_iter, ridge=ridge)

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b`` with the selected solver; see the class docstring."""
        solver = self.select(op)
        result = solver(op, b, x0)
        if not isinstance(solver, (CG, MINRES)):
            return result
        status = result.status
        retry = ~result.converged & ((status == int(Status.BREAKDOWN))
                                     | (status == int(Status.STAGNATION)))
        if not bool(retry.any()):
            return result
        rows = retry.unsqueeze(-1)
        b2 = torch.where(rows, b, torch.zeros_like(b))  # other rows: b = 0, nothing to do
        x2 = torch.where(rows, result.solution, torch.zeros_like(b))
        gmres = GMRES(rtol=self.rtol, atol=self.atol, max_iter=self.max_iter, ridge=self.ridge)
        second = gmres(op, b2, x2)
        tol_hit = second.converged
        return Result(
            solution=torch.where(rows, second.solution, result.solution),
            converged=torch.where(retry, tol_hit, result.converged),
            iterations=torch.where(retry, result.iterations + second.iterations, result.iterations),
            residual=torch.where(retry, second.residual, result.residual),
            status=torch.where(retry, second.status, result.status),
        )

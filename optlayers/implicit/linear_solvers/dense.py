"""Dense batched factorizations (LU, Cholesky, QR) of a materialized operator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..._result import Result, Status
from ._base import LinearOperator, LinearSolver, check_fields, conclude, prepare

__all__ = ["Dense"]

_METHODS = ("auto", "lu", "cholesky", "qr")
Solve = Callable[[torch.Tensor], torch.Tensor]


def _well_posed(pivots: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows whose pivot magnitudes are finite and ``min > n ε max`` (``(B, n) -> (B,)``)."""
    n = pivots.shape[-1]
    finite = torch.isfinite(pivots).all(dim=-1)
    return finite & (pivots.amin(dim=-1) > n * eps * pivots.amax(dim=-1))


@dataclasses.dataclass(frozen=True)
class Dense(LinearSolver):
    r"""Materialize ``A + ridge I`` (``n`` vmapped matvecs) and solve by a batched factorization.

    Factorizations (``method``):
        * ``"lu"``: ``P A = L U`` with partial pivoting (``torch.linalg.lu_factor_ex``).
        * ``"cholesky"``: ``A = L Lᵀ`` for symmetric positive definite ``A``; a failed
          factorization (``A`` not positive definite) gives ``BREAKDOWN``.
        * ``"qr"``: ``A = Q R`` (Householder), ``x = R⁻¹ Qᵀ b``.
        * ``"auto"`` (default): Cholesky when the operator is tagged symmetric, falling back to
          LU on the elements where it fails; LU otherwise.

    Each solve is followed by ``refine`` steps of iterative refinement,
    ``x ← x + \operatorname{solve}(b − A x)``. Ill-posedness is flagged, never hidden: a pivot
    (``|U_ii|``, ``|R_ii|`` or ``L_ii²``) with ``min ≤ n ε max`` marks the element ``SINGULAR``
    (its solution is left at ``x0``, zeros by default), and an element whose final residual
    misses ``max(atol, rtol ‖b‖)`` is also reported ``SINGULAR`` (ill-conditioned for this
    precision). Non-finite matrix entries give ``NONFINITE``.

    Args:
        method: ``"auto"``, ``"lu"``, ``"cholesky"`` or ``"qr"``.
        ridge: Tikhonov shift added to ``A``.
        rtol: Relative tolerance of the residual check; None means 1e-12 in float64 and 1e-4
            in lower precision (the round-off floor of a direct solve).
        atol: Absolute tolerance of the residual check.
        refine: Iterative-refinement steps (``>= 0``).

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import Dense, LinearOperator
        >>> A = torch.tensor([[[2.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
        >>> Dense("lu")(LinearOperator.from_dense(A), torch.ones(1, 2, dtype=torch.float64)).solution
        tensor([[0., 1.]], dtype=torch.float64)

    References:
        Golub & Van Loan, "Matrix Computations", 4th ed., §3.2 (LU), §4.2 (Cholesky), §5.2 (QR),
        §3.5.3 (iterative refinement).
    """

    method: str = "auto"
    _: dataclasses.KW_ONLY
    ridge: float = 0.0
    rtol: float | None = None
    atol: float = 0.0
    refine: int = 1

    def __post_init__(self) -> None:
        check_fields(self, rtol=self.rtol, atol=self.atol, ridge=self.ridge)
        if not isinstance(self.method, str) or self.method.lower() not in _METHODS:
            raise ValueError(f"Dense: method must be one of {list(_METHODS)}, got {self.method!r}")
        object.__setattr__(self, "method", self.method.lower())
        if not isinstance(self.refine, int) or isinstance(self.refine, bool) or self.refine < 0:
            raise ValueError(f"Dense: refine must be an int >= 0, got {self.refine!r}")

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        # In low precision the residual of a direct solve sits at the round-off floor
        # (≈ n·eps·cond); accept that by default rather than calling a well-posed system singular.
        rtol = self.rtol if self.rtol is not None or b.dtype == torch.float64 else 1e-4
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=rtol, atol=self.atol)
        b, n = prep.b, op.n
        eps = torch.finfo(b.dtype).eps
        A = prep.op.materialize()
        finite = torch.isfinite(A).all(dim=-1).all(dim=-1)
        skip = prep.done | ~finite
        eye = torch.eye(n, dtype=A.dtype, device=A.device).expand_as(A)
        M = torch.where(skip[:, None, None], eye, A)

        x = prep.x
        flag = torch.full(skip.shape, int(Status.SINGULAR), dtype=torch.int64, device=b.device)
        flag = torch.where(finite, flag, torch.full_like(flag, int(Status.NONFINITE)))
        todo = ~skip
        method = self.method
        if method == "cholesky" or (method == "auto" and op.symmetric):
            L, info = torch.linalg.cholesky_ex(M)
            ok = todo & (info == 0) & _well_posed(L.diagonal(dim1=-2, dim2=-1).square(), eps)
            x = self._solve(M, b, x, ok, lambda v: torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1))
            if method == "cholesky":
                not_pd = todo & (info != 0)
                flag = torch.where(not_pd, torch.full_like(flag, int(Status.BREAKDOWN)), flag)
            todo = todo & ~ok
        if method == "lu" or (method == "auto" and bool(todo.any())):
            LU, piv, info = torch.linalg.lu_factor_ex(M)
            ok = todo & (info == 0) & _well_posed(LU.diagonal(dim1=-2, dim2=-1).abs(), eps)
            x = self._solve(M, b, x, ok,
                            lambda v: torch.linalg.lu_solve(LU, piv, v.unsqueeze(-1)).squeeze(-1))
        if method == "qr":
            Q, R = torch.linalg.qr(M)
            ok = todo & _well_posed(R.diagonal(dim1=-2, dim2=-1).abs(), eps)

            def qr_solve(v: torch.Tensor) -> torch.Tensor:
                rhs = (Q.transpose(-1, -2) @ v.unsqueeze(-1))
                return torch.linalg.solve_triangular(R, rhs, upper=True).squeeze(-1)

            x = self._solve(M, b, x, ok, qr_solve)
        iters = (~prep.done).to(torch.int64)
        return conclude(prep, x, iters, flag)

    def _solve(self, M: torch.Tensor, b: torch.Tensor, x: torch.Tensor, ok: torch.Tensor,
               solve: Solve) -> torch.Tensor:
        """Solve with refinement; keep ``x`` where ``ok`` is False."""
        if not bool(ok.any()):
            return x
        z = solve(b)
        for _ in range(self.refine):
            z = z + solve(b - (M @ z.unsqueeze(-1)).squeeze(-1))
        return torch.where(ok.unsqueeze(-1), z, x)

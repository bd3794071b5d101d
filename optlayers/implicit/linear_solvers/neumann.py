"""Truncated Neumann series for batches of systems (an approximate inverse by design)."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..._result import Result
from ._base import Callback, LinearOperator, LinearSolver, check_fields, conclude, prepare

__all__ = ["Neumann"]


@dataclasses.dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series ``x = α Σ_{k=0}^{K-1} (I − αA)^k b``.

    When the spectral radius ``ρ(I − αA) < 1`` (for symmetric positive definite ``A`` with
    largest eigenvalue ``L``: ``0 < α < 2/L``) the series converges to ``A⁻¹ b``, and its
    residual after ``K`` terms is exactly

    .. math::
        b − A x_K = (I − αA)^K (b − A x_0),

    so the error shrinks geometrically with ``terms``. With a warm start the series is applied
    to the residual: ``x = x₀ + α Σ_k (I − αA)^k (b − A x₀)``. It costs ``terms − 1`` matvecs
    and needs no transpose; this is the inverse-Hessian approximation of Lorraine et al.

    The series is an approximation by design, so the acceptance test differs from the Krylov
    solvers: with ``rtol=None`` (default) an element is accepted when its result is finite
    and the series did not diverge, ``‖A x − b‖ ≤ ‖A x₀ − b‖``; a diverging series (``α`` too
    large, ``A`` not positive definite) is reported as ``MAX_ITER`` or ``NONFINITE``. With a
    float ``rtol`` the usual test ``‖A x − b‖ ≤ rtol ‖b‖`` applies.

    Args:
        terms: Number of series terms ``K >= 1``.
        alpha: Step size ``α > 0``.
        ridge: Tikhonov shift added to ``A``.
        rtol: Relative tolerance of the acceptance test, or None (see above).
        callback: Called with ``(k, ‖r_k‖)``, ``r_k`` the residual after ``k`` terms, shape
            ``(B,)`` (costs a norm).

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import Neumann, LinearOperator
        >>> A = torch.eye(2, dtype=torch.float64).expand(1, 2, 2) * 0.5
        >>> Neumann(60, 1.0)(LinearOperator.from_dense(A), torch.ones(1, 2, dtype=torch.float64)).solution
        tensor([[2., 2.]], dtype=torch.float64)

    References:
        Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
        Differentiation", AISTATS 2020.
    """

    terms: int = 100
    alpha: float = 1.0
    _: dataclasses.KW_ONLY
    ridge: float = 0.0
    rtol: float | None = None
    callback: Callback | None = None

    def __post_init__(self) -> None:
        check_fields(self, rtol=self.rtol, ridge=self.ridge)
        if not isinstance(self.terms, int) or isinstance(self.terms, bool) or self.terms < 1:
            raise ValueError(f"Neumann: terms must be a positive int, got {self.terms!r}")
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"Neumann: alpha must be a finite float > 0, got {self.alpha!r}")

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Sum the series for ``(A + ridge I) x = b``; see the class docstring."""
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol or 0.0, atol=0.0)
        A, x, alpha = prep.op, prep.x, self.alpha
        live = (~prep.done).unsqueeze(-1)
        r0 = torch.where(live, prep.b - A.matvec(x), torch.zeros_like(x))
        term = alpha * r0
        total = term
        for k in range(1, self.terms):
            term = term - alpha * A.matvec(term)
            total = total + term
            if self.callback is not None:  # residual after k terms: (I − αA)^k r0 = term_k / α
                self.callback(k, torch.linalg.vector_norm(term, dim=-1) / alpha)
        x = torch.where(live, x + total, x)
        if self.rtol is None:
            prep = dataclasses.replace(prep, tol=torch.linalg.vector_norm(r0, dim=-1))
        iters = torch.where(prep.done, 0, torch.full(prep.done.shape, self.terms, device=x.device))
        return conclude(prep, x, iters)

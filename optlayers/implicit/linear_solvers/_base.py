"""Linear operators and the common interface of the adjoint linear solvers.

All linear solvers act on a batch of independent systems ``A_i x_i = b_i`` stored flat:
``b`` has shape ``(B, n)`` and the operator maps ``(B, n) -> (B, n)`` element-wise in the batch.
Solvers are frozen dataclasses; calling ``solver(op, b, x0=None)`` returns a :class:`Result`
whose ``solution`` is ``x`` of shape ``(B, n)`` and whose flags have shape ``(B,)``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable

import torch

from ..._result import Result, Status

__all__ = [
    "Callback",
    "LinearOperator",
    "KrylovSolver",
    "LinearSolver",
    "Monitor",
    "Prepared",
    "check_fields",
    "conclude",
    "confirm",
    "default_max_iter",
    "default_rtol",
    "dot",
    "finish",
    "keep_best",
    "prepare",
    "stall_update",
    "stall_window",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class LinearOperator:
    """A batch of ``B`` square ``n x n`` operators given by their action on vectors.

    Attributes:
        matvec: ``v (B, n) -> A v (B, n)``.
        rmatvec: ``v (B, n) -> Aᵀ v (B, n)``, or None when unavailable (then only solvers
            that need no transpose apply, unless ``symmetric``).
        batch: ``B``.
        n: ``n``.
        dtype: Floating dtype of the vectors.
        device: Device of the vectors.
        symmetric: True when ``A = Aᵀ`` (CG, MINRES and Cholesky then apply).
        positive_definite: True when ``A`` is symmetric positive definite.

    The operator is the map ``v_i ↦ A_i v_i`` for ``i = 1, …, B``; ``T`` is ``v_i ↦ A_iᵀ v_i``,
    ``with_ridge(ρ)`` is ``v_i ↦ (A_i + ρ I) v_i`` and ``materialize()`` returns the matrices
    ``[A_i]_{jk} = (A_i e_k)_j``.

    Example:
        A matrix-free operator ``A v = 2 v + (1ᵀ v) 1`` (so ``A = 2 I + 1 1ᵀ``) and a dense one:

        >>> import torch
        >>> from optlayers.implicit.linear_solvers import LinearOperator
        >>> op = LinearOperator(matvec=lambda v: 2 * v + v.sum(-1, keepdim=True), rmatvec=None,
        ...                     batch=1, n=2, dtype=torch.float64, device=torch.device("cpu"),
        ...                     symmetric=True, positive_definite=True)
        >>> op.materialize()
        tensor([[[3., 1.],
                 [1., 3.]]], dtype=torch.float64)
        >>> M = LinearOperator.from_dense(torch.tensor([[[2.0, 1.0], [0.0, 3.0]]], dtype=torch.float64))
        >>> v = torch.ones(1, 2, dtype=torch.float64)
        >>> M.matvec(v), M.T.matvec(v), M.with_ridge(1.0).matvec(v)
        (tensor([[3., 3.]], dtype=torch.float64), tensor([[2., 4.]], dtype=torch.float64),
         tensor([[4., 4.]], dtype=torch.float64))
    """

    matvec: Matvec
    rmatvec: Matvec | None
    batch: int
    n: int
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = False
    positive_definite: bool = False

    @staticmethod
    def from_dense(matrix: torch.Tensor, *, symmetric: bool = False,
                   positive_definite: bool = False) -> LinearOperator:
        """Wrap a dense ``(B, n, n)`` matrix."""
        if matrix.dim() != 3 or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(f"matrix must have shape (B, n, n), got {tuple(matrix.shape)}")
        return LinearOperator(
            matvec=lambda v: (matrix @ v.unsqueeze(-1)).squeeze(-1),
            rmatvec=lambda v: (matrix.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1),
            batch=matrix.shape[0], n=matrix.shape[-1], dtype=matrix.dtype, device=matrix.device,
            symmetric=symmetric or positive_definite, positive_definite=positive_definite,
        )

    @property
    def T(self) -> LinearOperator:
        """The transposed operator."""
        if self.rmatvec is None and not self.symmetric:
            raise ValueError("this operator has no transpose (rmatvec is None)")
        rm = self.rmatvec if self.rmatvec is not None else self.matvec
        return dataclasses.replace(self, matvec=rm, rmatvec=self.matvec)

    def with_ridge(self, ridge: float) -> LinearOperator:
        """The operator ``A + ridge * I``."""
        if ridge == 0.0:
            return self
        mv, rmv = self.matvec, self.rmatvec
        return dataclasses.replace(
            self,
            matvec=lambda v: mv(v) + ridge * v,
            rmatvec=None if rmv is None else (lambda v: rmv(v) + ridge * v),
            positive_definite=self.positive_definite and ridge > 0,
        )

    def materialize(self) -> torch.Tensor:
        """The dense matrices, shape ``(B, n, n)``, built from ``n`` matvecs (vmapped)."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        basis = eye.unsqueeze(1).expand(self.n, self.batch, self.n)
        try:
            cols = torch.func.vmap(self.matvec)(basis)  # (n, B, n): cols[k] = A e_k
        except Exception:  # noqa: BLE001  (operators that cannot be vmapped: a loop is correct)
            cols = torch.stack([self.matvec(basis[k]) for k in range(self.n)])
        return cols.permute(1, 2, 0)


class LinearSolver(abc.ABC):
    r"""Base class of the linear-solver configs (each a frozen dataclass).

    A config is called as ``solver(op, b, x0=None)`` and solves, for each batch element ``i``,

    .. math:: (A_i + ρ I)\, x_i = b_i, \qquad ρ = \texttt{ridge},

    returning a :class:`~optlayers.Result` whose ``solution`` is ``x`` ``(B, n)`` and whose
    ``residual`` is the relative residual ``‖(A_i + ρ I) x_i − b_i‖ / ‖b_i‖``. Subclass it to plug a
    custom solver into :class:`ImplicitAdjoint`.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import CG, Dense, LinearOperator, LinearSolver
        >>> isinstance(CG(), LinearSolver)
        True
        >>> op = LinearOperator.from_dense(torch.tensor([[[2.0, 1.0], [0.0, 3.0]]], dtype=torch.float64))
        >>> Dense(ridge=1.0)(op, torch.ones(1, 2, dtype=torch.float64)).solution  # (A + I) x = 1
        tensor([[0.2500, 0.2500]], dtype=torch.float64)
    """

    ridge: float = 0.0

    @abc.abstractmethod
    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b`` for a batch; returns a flat :class:`Result`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KrylovSolver(LinearSolver):
    """The common configuration of the Krylov solvers (CG, MINRES, BiCGStab, NormalCG, GMRES).

    Attributes:
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance; an element stops when ``‖A x − b‖ ≤ max(atol, rtol ‖b‖)``.
        max_iter: Iteration limit; None means ``max(10 n, 50)``.
        ridge: Tikhonov shift added to ``A``.
        callback: Called after every iteration with ``(k, ‖r‖)``, ``‖r‖`` of shape ``(B,)``.
    """

    rtol: float | None = None
    atol: float = 0.0
    max_iter: int | None = None
    ridge: float = 0.0
    callback: Callback | None = None

    def __post_init__(self) -> None:
        check_fields(self, rtol=self.rtol, atol=self.atol, max_iter=self.max_iter, ridge=self.ridge)


def finish(x: torch.Tensor, op: LinearOperator, b: torch.Tensor, iterations: torch.Tensor,
           tol: torch.Tensor, flag: torch.Tensor | None = None) -> Result:
    """Common epilogue: compute the true residual and per-element status.

    Args:
        x: The candidate solution ``(B, n)``.
        op: The operator *with* ridge already applied.
        b: Right-hand side ``(B, n)``.
        iterations: int64 ``(B,)``.
        tol: Absolute tolerance on ``‖Ax - b‖`` per element ``(B,)``.
        flag: Optional int64 ``(B,)`` status for elements that stopped early
            (BREAKDOWN, STAGNATION, SINGULAR); 0 elsewhere.

    Returns:
        Result with ``residual`` the relative residual ``‖Ax - b‖ / max(‖b‖, tiny)``.
    """
    r = op.matvec(x) - b
    rnorm = torch.linalg.vector_norm(r, dim=-1)
    bnorm = torch.linalg.vector_norm(b, dim=-1)
    finite = torch.isfinite(x).all(dim=-1) & torch.isfinite(rnorm)
    # A tiny slack absorbs the round-off between the recurrence residual and the true one.
    converged = finite & (rnorm <= tol * (1 + 1e-6) + 10 * torch.finfo(b.dtype).eps * bnorm)
    status = torch.full(converged.shape, int(Status.MAX_ITER), dtype=torch.int64, device=b.device)
    if flag is not None:
        status = torch.where(flag != 0, flag, status)
    status = torch.where(finite, status, torch.full_like(status, int(Status.NONFINITE)))
    status = torch.where(converged, torch.zeros_like(status), status)
    rel = rnorm / bnorm.clamp_min(torch.finfo(b.dtype).tiny)
    rel = torch.where(bnorm > 0, rel, rnorm)
    return Result(solution=x, converged=converged, iterations=iterations, residual=rel, status=status)


# --------------------------------------------------------------------------------------------
# Shared helpers of the solver implementations (validation, prologue, stagnation tracking).
# --------------------------------------------------------------------------------------------

#: An iteration "improves" when the residual drops below this fraction of the best one so far.
STALL_FACTOR = 0.99


def default_rtol(dtype: torch.dtype, rtol: float | None) -> float:
    """``rtol``, or its dtype default when None: 1e-12 for float64, 1e-6 otherwise."""
    if rtol is not None:
        return float(rtol)
    return 1e-12 if dtype == torch.float64 else 1e-6


def default_max_iter(n: int, max_iter: int | None) -> int:
    """``max_iter``, or ``max(10 n, 50)`` when None."""
    return max(10 * n, 50) if max_iter is None else max_iter


def stall_window(n: int) -> int:
    """Iterations without improvement (see :data:`STALL_FACTOR`) that mean stagnation.

    ``max(50, min(2 n, 1000))``: generous, since Krylov residuals can plateau for a while (CG
    on ill-conditioned systems) before dropping; stopping early would waste the work done.
    """
    return max(50, min(2 * n, 1000))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_fields(obj: object, *, rtol: float | None = None, atol: float = 0.0,
                 max_iter: int | None = None, ridge: float = 0.0) -> None:
    """Validate the common config fields; raise ``ValueError`` naming the bad one."""
    name = type(obj).__name__
    if rtol is not None and (not _is_real(rtol) or not math.isfinite(rtol) or rtol < 0):
        raise ValueError(f"{name}: rtol must be a finite float >= 0 or None, got {rtol!r}")
    if not _is_real(atol) or not math.isfinite(atol) or atol < 0:
        raise ValueError(f"{name}: atol must be a finite float >= 0, got {atol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or isinstance(max_iter, bool)
                                 or max_iter < 1):
        raise ValueError(f"{name}: max_iter must be a positive int or None, got {max_iter!r}")
    if not _is_real(ridge) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{name}: ridge must be a finite float >= 0, got {ridge!r}")


def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products of two ``(B, n)`` tensors, shape ``(B,)``."""
    return (u * v).sum(dim=-1)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated, sanitized batch of systems, ready for an iteration.

    Attributes:
        op: The operator with ``ridge`` applied.
        b: Right-hand side with non-finite rows replaced by zeros.
        x: Initial iterate (``x0`` or zeros; zeros on rows with ``b = 0`` or bad input).
        tol: Absolute tolerance per row, ``max(atol, rtol ‖b‖)``.
        bad: Rows whose ``b`` or ``x0`` is not finite (reported as NONFINITE).
        done: Rows with nothing to solve (``bad`` or ``b = 0``, whose solution is 0).
        b_orig: The right-hand side as given.
    """

    op: LinearOperator
    b: torch.Tensor
    x: torch.Tensor
    tol: torch.Tensor
    bad: torch.Tensor
    done: torch.Tensor
    b_orig: torch.Tensor


def prepare(op: LinearOperator, b: torch.Tensor, x0: torch.Tensor | None, *, ridge: float,
            rtol: float | None, atol: float) -> Prepared:
    """Check shapes, apply the ridge, sanitize non-finite rows and compute tolerances."""
    if not isinstance(b, torch.Tensor) or not b.is_floating_point():
        raise ValueError("b must be a floating-point tensor")
    if tuple(b.shape) != (op.batch, op.n):
        raise ValueError(f"b must have shape (batch, n) = {(op.batch, op.n)}, got {tuple(b.shape)}")
    if b.dtype != op.dtype:
        raise ValueError(f"b has dtype {b.dtype} but the operator has dtype {op.dtype}")
    if x0 is not None and tuple(x0.shape) != tuple(b.shape):
        raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
    bad = ~torch.isfinite(b).all(dim=-1)
    if x0 is not None:
        bad = bad | ~torch.isfinite(x0).all(dim=-1)
    b_clean = torch.where(bad.unsqueeze(-1), torch.zeros_like(b), b)
    bnorm = torch.linalg.vector_norm(b_clean, dim=-1)
    done = bad | (bnorm == 0)
    x = torch.zeros_like(b) if x0 is None else x0.to(b.dtype)
    x = torch.where(done.unsqueeze(-1), torch.zeros_like(x), x)
    tol = torch.clamp(default_rtol(b.dtype, rtol) * bnorm, min=atol)
    return Prepared(op=op.with_ridge(ridge), b=b_clean, x=x, tol=tol, bad=bad, done=done,
                    b_orig=b)


def conclude(prep: Prepared, x: torch.Tensor, iterations: torch.Tensor,
             flag: torch.Tensor | None = None) -> Result:
    """Epilogue: NaN solutions on bad rows, then :func:`finish` against the original ``b``."""
    x = torch.where(prep.bad.unsqueeze(-1), torch.full_like(x, float("nan")), x)
    return finish(x, prep.op, prep.b_orig, iterations, prep.tol, flag)


def stall_update(rnorm: torch.Tensor, best: torch.Tensor, count: torch.Tensor,
                 active: torch.Tensor, steps: int | torch.Tensor = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Track stagnation: ``best`` residual so far and iterations since it last improved."""
    improved = rnorm < STALL_FACTOR * best
    best = torch.where(active & improved, rnorm, best)
    count = torch.where(active, torch.where(improved, torch.zeros_like(count), count + steps), count)
    return best, count


def keep_best(op: LinearOperator, b: torch.Tensor, x: torch.Tensor, x_best: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """On ``rows``, return whichever of ``x`` and ``x_best`` has the smaller true residual.

    Used by methods with non-monotone residuals (CG, BiCGStab) so that an element that stops
    unconverged returns its best iterate rather than the last one (its status is unchanged).
    """
    if not bool(rows.any()):
        return x
    last = torch.linalg.vector_norm(op.matvec(x) - b, dim=-1)
    best = torch.linalg.vector_norm(op.matvec(x_best) - b, dim=-1)
    return torch.where((rows & (best < last)).unsqueeze(-1), x_best, x)


def confirm(op: LinearOperator, b: torch.Tensor, x: torch.Tensor, candidates: torch.Tensor,
            tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Check claimed convergence against the true residual ``b − A x`` on ``candidates``.

    Recurrence residuals drift from the true one through round-off; a loop confirms every claim
    before it stops an element. Returns None when there is nothing to check (no host work beyond
    one ``any``), else ``(ok, r_true, ‖r_true‖)`` with ``ok = candidates & (‖r_true‖ ≤ tol)``.
    """
    if not bool(candidates.any()):
        return None
    r_true = b - op.matvec(x)
    tnorm = torch.linalg.vector_norm(r_true, dim=-1)
    return candidates & (tnorm <= tol), r_true, tnorm


class Monitor:
    """Per-element bookkeeping shared by the batched Krylov loops.

    Holds the status flag and iteration count of each system, detects stagnation (no
    :data:`STALL_FACTOR` improvement of the best residual during :func:`stall_window` iterations)
    and, when built with ``x``, remembers the iterate of smallest recurrence residual so that an
    element stopping unconverged returns its best iterate (see :func:`keep_best`).

    Args:
        rnorm: Initial residual norms ``(B,)``.
        n: System size (sets the stagnation window).
        x: Initial iterate ``(B, n)`` when the best iterate must be kept (non-monotone methods).
    """

    def __init__(self, rnorm: torch.Tensor, n: int, x: torch.Tensor | None = None) -> None:
        self.flag = torch.zeros_like(rnorm, dtype=torch.int64)
        self.iters = torch.zeros_like(self.flag)
        self.best, self.count = rnorm, torch.zeros_like(self.flag)
        self.window = stall_window(n)
        self.x_best, self.r_best = x, rnorm

    def fail(self, mask: torch.Tensor, status: Status) -> torch.Tensor:
        """Record ``status`` on ``mask`` (leaving earlier flags alone); returns ``mask``."""
        self.flag = torch.where(mask & (self.flag == 0), torch.full_like(self.flag, int(status)), self.flag)
        return mask

    def count_step(self, active: torch.Tensor, steps: int | torch.Tensor = 1) -> None:
        """Add ``steps`` iterations to the active elements' counts."""
        self.iters = self.iters + active.to(self.iters.dtype) * steps

    def track(self, rnorm: torch.Tensor, active: torch.Tensor, x: torch.Tensor | None = None,
              steps: int | torch.Tensor = 1) -> torch.Tensor:
        """End of an iteration: keep the best iterate, flag stagnation; returns the new ``active``."""
        if self.x_best is not None and x is not None:
            better = active & (rnorm < self.r_best)
            self.x_best = torch.where(better.unsqueeze(-1), x, self.x_best)
            self.r_best = torch.where(better, rnorm, self.r_best)
        self.best, self.count = stall_update(rnorm, self.best, self.count, active, steps)
        stalled = self.fail(active & (self.count >= self.window), Status.STAGNATION)
        return active & ~stalled

    def result(self, prep: Prepared, x: torch.Tensor, active: torch.Tensor) -> Result:
        """The :class:`Result` (best iterate on elements that stopped unconverged, if kept)."""
        if self.x_best is not None:
            x = keep_best(prep.op, prep.b, x, self.x_best, (self.flag != 0) | active)
        return conclude(prep, x, self.iters, self.flag)

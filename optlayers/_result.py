"""Shared result types: :class:`Result`, :class:`Status` and the errors every solver raises.

Every solver and layer in optlayers returns a :class:`Result`. Its fields are tensors of the
batch shape (0-d when unbatched), so one failed element never hides behind a batch mean and
the flags travel through ``torch.func`` transforms (``Result`` is a registered pytree).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Generic, TypeVar

import torch
import torch.utils._pytree as pytree

__all__ = ["Result", "Status", "ConvergenceError", "AdjointSolveError", "raise_if_failed"]


class Status(enum.IntEnum):
    """Outcome of a solve, stored per batch element as an integer tensor.

    For batch element ``b``, ``status_b = SUCCESS (0)`` exactly when ``converged_b`` holds, i.e. the
    solver's stopping quantity met its tolerance, ``r_b ≤ tol_b``; otherwise the code says why not
    (``MAX_ITER`` when ``k_b = max_iter``, ``NONFINITE`` when ``r_b ∉ ℝ``, ...). Each member carries
    :attr:`hint`, an actionable sentence used in error messages.

    Example:
        >>> import torch
        >>> from optlayers import Status
        >>> codes = torch.tensor([0, 1, 2])
        >>> [Status(int(c)).name for c in codes]
        ['SUCCESS', 'MAX_ITER', 'NONFINITE']
        >>> bool(codes[1] == Status.MAX_ITER), Status.SINGULAR.hint.split(";")[0]
        (True, 'the linear system is singular')
    """

    SUCCESS = 0
    MAX_ITER = 1
    NONFINITE = 2
    STAGNATION = 3
    BREAKDOWN = 4
    INFEASIBLE = 5
    UNBOUNDED = 6
    SINGULAR = 7

    @property
    def hint(self) -> str:
        return _HINTS[self]


_HINTS = {
    Status.SUCCESS: "the solve met its tolerance.",
    Status.MAX_ITER: "the iteration limit was reached before the tolerance; raise max_iter, "
    "loosen rtol/atol, warm-start from a better z0, or pick a faster solver.",
    Status.NONFINITE: "a NaN or infinity appeared; check the inputs for NaN/inf, lower the step "
    "size, or use float64.",
    Status.STAGNATION: "the residual stopped decreasing above the tolerance; the problem may be "
    "ill-conditioned: add a ridge term, precondition, or loosen the tolerance.",
    Status.BREAKDOWN: "the method broke down (a zero or negative curvature or pivot); the operator "
    "may not be symmetric positive definite: use GMRES, MINRES or Dense, or add ridge.",
    Status.INFEASIBLE: "the problem is infeasible: no point satisfies the constraints; check the "
    "constraint data.",
    Status.UNBOUNDED: "the problem is unbounded: the objective decreases without limit; add bounds "
    "or regularization.",
    Status.SINGULAR: "the linear system is singular; add a ridge term (e.g. ridge=1e-8) or pick "
    "another linear solver (GMRES, MINRES, NormalCG).",
}


class ConvergenceError(RuntimeError):
    """A solve did not succeed and ``throw=True`` was in force.

    Raised when ``∃ b: ¬converged_b`` (some batch element's stopping quantity stayed above its
    tolerance, ``r_b > tol_b``). The message names the solver, the worst status, the worst residual
    against the tolerance, the iterations against ``max_iter`` and the first failing batch indices,
    followed by a hint on what to change. With ``throw=False`` nothing raises and the same
    :class:`Result` is returned for the caller to inspect.

    Attributes:
        result: The :class:`Result` that failed, for inspection.

    Example:
        ``z² + 1 = 0`` has no real root, so Newton's method cannot converge:

        >>> import torch
        >>> from optlayers import ConvergenceError, Status, root_solve
        >>> try:
        ...     root_solve(lambda z: z ** 2 + 1, torch.tensor(1.0, dtype=torch.float64))
        ... except ConvergenceError as err:
        ...     print(str(err).split(";")[0])
        ...     print(Status(int(err.result.status)).name, bool(err.result.converged))
        root_solve(Newton) failed with status MAX_ITER
        MAX_ITER False
    """

    def __init__(self, message: str, result: Result | None = None) -> None:
        super().__init__(message)
        self.result = result


class AdjointSolveError(ConvergenceError):
    """The linear system of an implicit gradient (the adjoint) could not be solved.

    Backward through ``F(z*, θ) = 0`` solves ``(∂_z F)ᵀ u = ḡ``; this error is raised (in backward)
    when that solve fails, typically because ``∂_z F`` is singular at ``z*`` or the linear solver
    does not suit it. Adding a ridge (``(∂_z F)ᵀ + ρ I``), choosing ``Dense()``/``GMRES()``, or
    checking that the forward solve converged usually fixes it. A subclass of
    :class:`ConvergenceError`, so ``except ConvergenceError`` catches both.

    Example:
        The cube root ``z* = a^{1/3}`` solves ``z³ − a = 0``, whose Jacobian ``3 z²`` vanishes at
        ``a = 0``:

        >>> import torch
        >>> from optlayers import AdjointSolveError, ConvergenceError
        >>> from optlayers.implicit import CG, ImplicitAdjoint, custom_root
        >>> @custom_root(lambda z, a: z ** 3 - a, adjoint=ImplicitAdjoint(linear_solver=CG()))
        ... def cbrt(z0, a):
        ...     return torch.sign(a) * a.abs() ** (1 / 3)
        >>> a = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        >>> try:
        ...     cbrt(torch.ones((), dtype=torch.float64), a).backward()
        ... except AdjointSolveError as err:
        ...     print(isinstance(err, ConvergenceError), "BREAKDOWN" in str(err))
        True True
    """


A = TypeVar("A")


@dataclasses.dataclass(frozen=True)
class Result(Generic[A]):
    """The outcome of a solve.

    Attributes:
        solution: The solution ``z`` (a tensor, or a pytree of tensors for some solvers).
        converged: Bool tensor of the batch shape; True where the stopping test held.
        iterations: int64 tensor of the batch shape; iterations used per element.
        residual: Float tensor of the batch shape; the quantity the stopping test compares
            with its tolerance.
        status: int64 tensor of :class:`Status` codes, batch shape.
        aux: Solver-specific typed extras (duals, potentials, plans), or None.

    For each batch element ``b``, ``converged_b ⇔ residual_b ≤ tol_b``, where ``residual_b`` is the
    solver's stopping quantity (e.g. ``‖F(z_b, θ)‖₂`` for a root problem ``F = 0``) and ``tol_b``
    its tolerance; :attr:`success` is ``⋀_b converged_b``. ``Result`` is a registered pytree, so it
    passes through ``torch.func`` transforms.

    Example:
        >>> import torch
        >>> from optlayers import Result, Status
        >>> r = Result(solution=torch.zeros(2, 3), converged=torch.tensor([True, False]),
        ...            iterations=torch.tensor([7, 50]), residual=torch.tensor([1e-9, 0.5]),
        ...            status=torch.tensor([int(Status.SUCCESS), int(Status.MAX_ITER)]))
        >>> r.success, r.solution.shape
        (False, torch.Size([2, 3]))
        >>> r.replace(converged=torch.tensor([True, True])).success
        True
    """

    solution: Any
    converged: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    status: torch.Tensor
    aux: A = None  # type: ignore[assignment]

    @property
    def success(self) -> bool:
        """True when every batch element converged (a host synchronisation)."""
        return bool(torch.all(self.converged))

    def replace(self, **changes: Any) -> Result[A]:
        """Return a copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


def _result_flatten(r: Result) -> tuple[list[Any], Any]:
    return [r.solution, r.converged, r.iterations, r.residual, r.status, r.aux], None


def _result_unflatten(values: Any, context: Any) -> Result:
    return Result(*values)


pytree.register_pytree_node(
    Result,
    _result_flatten,
    _result_unflatten,
    serialized_type_name="optlayers.Result",
)


def register_aux(cls: type) -> type:
    """Class decorator registering a frozen dataclass of tensors as a pytree node.

    Every field is a child, so ``torch.func`` transforms map over the tensors inside.
    """
    fields = [f.name for f in dataclasses.fields(cls)]

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        return [getattr(obj, name) for name in fields], None

    def unflatten(values: Any, context: Any) -> Any:
        return cls(**dict(zip(fields, values)))

    pytree.register_pytree_node(
        cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}"
    )
    return cls


def failure_message(name: str, result: Result, *, tol: float | str | None = None,
                    max_iter: int | None = None) -> str:
    """Build the message of a :class:`ConvergenceError`.

    Names the solver, the worst status, the worst residual against the tolerance, the
    iterations against ``max_iter`` and the first failing batch indices.
    """
    conv = result.converged.detach()
    status = result.status.detach()
    failed = ~conv
    idx = torch.nonzero(failed.reshape(conv.shape) if conv.dim() else failed.reshape(1))
    codes = status[failed] if conv.dim() else status.reshape(1)[failed.reshape(1)]
    worst = Status(int(codes.max())) if codes.numel() else Status.MAX_ITER
    if codes.numel() and bool((codes == Status.SUCCESS).all()):
        worst = Status.MAX_ITER
    res = result.residual.detach()
    res_failed = res[failed] if conv.dim() else res.reshape(1)
    finite = res_failed[torch.isfinite(res_failed)] if res_failed.numel() else res_failed
    worst_res = float(finite.max()) if finite.numel() else float("nan")
    iters = int(result.iterations.detach().max()) if result.iterations.numel() else 0
    parts = [f"{name} failed with status {worst.name}"]
    shown_tol = "" if tol is None else f" vs tolerance {tol}" if isinstance(tol, str) else f" vs tolerance {tol:.3e}"
    parts.append(f"worst residual {worst_res:.3e}{shown_tol}")
    parts.append(f"{iters} iterations" + (f" of max_iter={max_iter}" if max_iter is not None else ""))
    if conv.dim():
        rows = idx[:5].tolist()
        shown = [tuple(row) if len(row) > 1 else row[0] for row in rows]
        more = "" if idx.shape[0] <= 5 else f" (+{idx.shape[0] - 5} more)"
        parts.append(f"failing batch indices {shown}{more} of batch shape {tuple(conv.shape)}")
    return "; ".join(parts) + f". Hint: {worst.hint}"


def raise_if_failed(name: str, result: Result, throw: bool, *, tol: float | str | None = None,
                    max_iter: int | None = None, error: type[ConvergenceError] = ConvergenceError) -> Result:
    """Raise ``error`` when ``throw`` and any element failed; return ``result`` otherwise.

    Raises when ``throw ∧ ∃ b: ¬converged_b``, with the message of :func:`failure_message`.

    Example:
        >>> import torch
        >>> r = Result(torch.zeros(2), torch.tensor([True, False]), torch.tensor([3, 10]),
        ...            torch.tensor([1e-9, 0.5]), torch.tensor([0, int(Status.MAX_ITER)]))
        >>> raise_if_failed("demo", r, throw=False) is r
        True
        >>> raise_if_failed("demo", r, throw=True, tol=1e-6, max_iter=10)
        Traceback (most recent call last):
            ...
        optlayers._result.ConvergenceError: demo failed with status MAX_ITER; worst residual 5.000e-01 vs ...
    """
    if throw and not bool(torch.all(result.converged)):
        raise error(failure_message(name, result, tol=tol, max_iter=max_iter), result)
    return result


def status_from(converged: torch.Tensor, residual: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:
    """Status codes from a convergence mask and residual: SUCCESS, NONFINITE or MAX_ITER.

    ``extra`` (int64, same shape) overrides where it is nonzero and the element did not converge.
    """
    status = torch.full(converged.shape, int(Status.MAX_ITER), dtype=torch.int64, device=converged.device)
    if extra is not None:
        status = torch.where(extra != 0, extra.to(torch.int64), status)
    status = torch.where(~torch.isfinite(residual), torch.full_like(status, int(Status.NONFINITE)), status)
    return torch.where(converged, torch.zeros_like(status), status)

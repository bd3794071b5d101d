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

    Each member carries :attr:`hint`, an actionable sentence used in error messages.
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

    Attributes:
        result: The :class:`Result` that failed, for inspection.
    """

    def __init__(self, message: str, result: Result | None = None) -> None:
        super().__init__(message)
        self.result = result


class AdjointSolveError(ConvergenceError):
    """The linear system of an implicit gradient (the adjoint) could not be solved."""


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


def failure_message(name: str, result: Result, *, tol: float | None = None,
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
    parts.append(f"worst residual {worst_res:.3e}" + (f" vs tolerance {tol:.3e}" if tol is not None else ""))
    parts.append(f"{iters} iterations" + (f" of max_iter={max_iter}" if max_iter is not None else ""))
    if conv.dim():
        rows = idx[:5].tolist()
        shown = [tuple(row) if len(row) > 1 else row[0] for row in rows]
        more = "" if idx.shape[0] <= 5 else f" (+{idx.shape[0] - 5} more)"
        parts.append(f"failing batch indices {shown}{more} of batch shape {tuple(conv.shape)}")
    return "; ".join(parts) + f". Hint: {worst.hint}"


def raise_if_failed(name: str, result: Result, throw: bool, *, tol: float | None = None,
                    max_iter: int | None = None, error: type[ConvergenceError] = ConvergenceError) -> Result:
    """Raise ``error`` when ``throw`` and any element failed; return ``result`` otherwise."""
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

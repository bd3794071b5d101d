"""``root_solve``: solve ``F(z, θ) = 0`` with Newton or Broyden; gradients by the IFT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._result import Result
from . import _flat
from ._frontend import solve
from .adjoints import Adjoint
from .solvers import Broyden, Newton

__all__ = ["root_solve"]


def root_solve(F: Callable[..., Any], z0: Any, *params: Any, solver: Newton | Broyden | None = None,
               adjoint: Adjoint | str | None = None, throw: bool = True, batch_ndim: int = 0,
               callback: Callable[..., None] | None = None) -> Result:
    """Find ``z*`` with ``F(z*, *params) = 0``; ``z*`` is differentiable in ``params``.

    The gradient uses the implicit function theorem on ``F`` itself,
    ``∂z*/∂θ = −(∂_z F)⁻¹ ∂_θ F`` (see :class:`ImplicitAdjoint`).

    Args:
        F: ``F(z, *params)`` returning the structure of ``z``.
        z0: Initial guess (tensor or pytree of tensors).
        *params: Differentiated parameters (tensors or pytrees).
        solver: :class:`Newton` (default, with line search) or :class:`Broyden`.
        adjoint: Gradient mode (default :class:`ImplicitAdjoint`).
        throw: Raise :class:`ConvergenceError` if any batch element fails.
        batch_ndim: Leading dimensions of ``z0`` and ``params`` indexing independent problems.
        callback: Called as ``callback(iteration, residual)``.

    Returns:
        :class:`Result` with ``solution`` shaped like ``z0`` and ``residual = ‖F(z)‖₂``.

    Raises:
        ConvergenceError: When ``throw`` and an element did not converge.

    Example:
        >>> import torch
        >>> a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> r = root_solve(lambda z, a: z ** 2 - a, torch.tensor(1.0, dtype=torch.float64), a)
        >>> torch.autograd.grad(r.solution, a)[0]  # 1 / (2 sqrt(a))
        tensor(0.3536, dtype=torch.float64)
    """
    solver = Newton() if solver is None else solver
    if not hasattr(solver, "run_root"):
        raise ValueError(f"solver must be Newton or Broyden for root_solve, got {type(solver).__name__}")
    return solve(
        name=f"root_solve({type(solver).__name__})", z0=z0, params=params, batch_ndim=batch_ndim,
        make_funcs=lambda lay, pt: {"F": _flat.same_shape(F, lay, pt, "F")},
        make_optimality=lambda lay, pt: _flat.same_shape(F, lay, pt, "F").flat,
        runner=lambda s, f, z: s.run_root(f["F"], z, callback=callback),
        solver=solver, adjoint=adjoint, throw=throw)

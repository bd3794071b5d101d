"""``fixed_point``: solve ``z = T(z, θ)`` with Picard or Anderson; gradients by the IFT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._result import Result
from . import _flat
from ._frontend import solve
from .adjoints import Adjoint
from .solvers import Anderson, Picard

__all__ = ["fixed_point"]


def fixed_point(T: Callable[..., Any], z0: Any, *params: Any, solver: Picard | Anderson | None = None,
                adjoint: Adjoint | str | None = None, throw: bool = True, batch_ndim: int = 0,
                callback: Callable[..., None] | None = None) -> Result:
    """Find ``z* = T(z*, *params)``; ``z*`` is differentiable in ``params``.

    Gradients use the condition ``z − T(z, θ) = 0``: reverse mode solves
    ``(I − ∂_z T)ᵀ u = ḡ`` and returns ``θ̄ = (∂_θ T)ᵀ u``.

    Args:
        T: ``T(z, *params)`` returning the structure of ``z``.
        z0: Initial guess.
        *params: Differentiated parameters.
        solver: :class:`Anderson` (default) or :class:`Picard`.
        adjoint: Gradient mode (default :class:`ImplicitAdjoint`; :class:`OneStepAdjoint` gives JFB).
        throw: Raise :class:`ConvergenceError` if any batch element fails.
        batch_ndim: Leading dimensions indexing independent problems.
        callback: Called as ``callback(iteration, residual)``.

    Returns:
        :class:`Result` with ``residual = ‖T(z) − z‖₂``.

    Example:
        >>> import torch
        >>> a = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        >>> r = fixed_point(lambda z, a: 0.5 * torch.cos(z) + a, torch.zeros(1, dtype=torch.float64), a)
        >>> bool(r.converged)
        True
    """
    solver = Anderson() if solver is None else solver
    if not hasattr(solver, "run_fixed_point"):
        raise ValueError(f"solver must be Picard or Anderson for fixed_point, got {type(solver).__name__}")

    def optimality(lay: Any, pt: Any) -> Callable[..., torch.Tensor]:
        Tf = _flat.same_shape(T, lay, pt, "T").flat
        return lambda z, *leaves: z - Tf(z, *leaves)

    return solve(
        name=f"fixed_point({type(solver).__name__})", z0=z0, params=params, batch_ndim=batch_ndim,
        make_funcs=lambda lay, pt: {"T": _flat.same_shape(T, lay, pt, "T")},
        make_optimality=optimality,
        runner=lambda s, f, z: s.run_fixed_point(f["T"], z, callback=callback),
        solver=solver, adjoint=adjoint, throw=throw)

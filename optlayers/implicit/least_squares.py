"""``least_squares``: nonlinear least squares with exact or Gauss–Newton implicit gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from .._result import Result
from . import _flat
from ._frontend import solve
from .adjoints import Adjoint
from .solvers import GaussNewton, LevenbergMarquardt

__all__ = ["least_squares"]


def least_squares(residual_fn: Callable[..., Any], z0: Any, *params: Any,
                  solver: GaussNewton | LevenbergMarquardt | None = None,
                  adjoint: Adjoint | str | None = None, throw: bool = True, batch_ndim: int = 0,
                  hessian: Literal["exact", "gauss_newton"] = "exact",
                  callback: Callable[..., None] | None = None) -> Result:
    """Minimize ``½‖r(z, *params)‖²``; the minimizer is differentiable in ``params``.

    Gradients use the exact first-order condition ``F = J_rᵀ r = 0``, whose Jacobian is
    ``JᵀJ + Σᵢ rᵢ ∇²rᵢ`` (applied matrix-free with Hessian-vector products). With
    ``hessian="gauss_newton"`` the adjoint operator is ``JᵀJ`` instead (``∂_θ F`` stays exact):
    cheaper, and exact only when ``r`` is linear in ``z`` or zero at the optimum.

    Args:
        residual_fn: ``r(z, *params)`` of shape ``(*batch, *m)``.
        z0: Initial point.
        *params: Differentiated parameters.
        solver: :class:`LevenbergMarquardt` (default) or :class:`GaussNewton`.
        adjoint: Gradient mode (default :class:`ImplicitAdjoint`).
        throw: Raise :class:`ConvergenceError` if any batch element fails.
        batch_ndim: Leading dimensions indexing independent problems.
        hessian: ``"exact"`` or ``"gauss_newton"`` operator in the adjoint system.
        callback: Called as ``callback(iteration, residual)``.

    Returns:
        :class:`Result`; ``residual`` is ``‖Jᵀr‖₂``.

    Example:
        >>> import torch
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = torch.exp(0.7 * t)
        >>> r = least_squares(lambda k, y: torch.exp(k * t) - y, torch.zeros((), dtype=torch.float64), y)
        >>> round(float(r.solution), 6)
        0.7
    """
    solver = LevenbergMarquardt() if solver is None else solver
    if not hasattr(solver, "run_least_squares"):
        raise ValueError(f"solver must be GaussNewton or LevenbergMarquardt, got {type(solver).__name__}")
    if hessian not in ("exact", "gauss_newton"):
        raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")

    def optimality(lay: Any, pt: Any) -> Callable[..., torch.Tensor]:
        rf = _flat.rows(residual_fn, lay, pt, "residual_fn").flat

        def F(z: torch.Tensor, *leaves: Any) -> torch.Tensor:
            return torch.func.grad(lambda zz: 0.5 * (rf(zz, *leaves) ** 2).sum())(z)

        return F

    def gauss_newton(lay: Any, pt: Any) -> Callable[..., torch.Tensor]:
        rf = _flat.rows(residual_fn, lay, pt, "residual_fn").flat

        def JtJ(u: torch.Tensor, z: torch.Tensor, *leaves: Any) -> torch.Tensor:
            r_of_z = lambda zz: rf(zz, *leaves)  # noqa: E731
            Ju = torch.func.jvp(r_of_z, (z,), (u,))[1]
            return torch.func.vjp(r_of_z, z)[1](Ju)[0]

        return JtJ

    return solve(
        name=f"least_squares({type(solver).__name__})", z0=z0, params=params, batch_ndim=batch_ndim,
        make_funcs=lambda lay, pt: {"r": _flat.rows(residual_fn, lay, pt, "residual_fn")},
        make_optimality=optimality,
        runner=lambda s, f, z: s.run_least_squares(f["r"], z, callback=callback),
        solver=solver, adjoint=adjoint, throw=throw, symmetric=True,
        make_operator=gauss_newton if hessian == "gauss_newton" else None)

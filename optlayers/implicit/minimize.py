"""``minimize``: smooth, projected and proximal minimization with implicit gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._result import Result
from . import _flat
from ._frontend import solve
from .adjoints import Adjoint
from .solvers import LBFGS, GradientDescent, ProjectedGradient, ProximalGradient

__all__ = ["minimize"]

MinimizeSolver = GradientDescent | LBFGS | ProjectedGradient | ProximalGradient


def minimize(f: Callable[..., Any], z0: Any, *params: Any, solver: MinimizeSolver | None = None,
             adjoint: Adjoint | str | None = None, throw: bool = True, batch_ndim: int = 0,
             callback: Callable[..., None] | None = None) -> Result:
    """Minimize ``f(z, *params)``; the minimizer is differentiable in ``params``.

    The optimality condition used for gradients matches the solver:

    * :class:`GradientDescent`, :class:`LBFGS`: ``∇_z f = 0`` (Hessian-vector products; the
      adjoint operator is symmetric, so ``Auto`` uses CG for large problems);
    * ``ProjectedGradient(projection)``: ``proj(z − η∇f) − z = 0``;
    * ``ProximalGradient(prox)``: ``prox(z − η∇f, η) − z = 0``, with ``η`` the solver's fixed
      step (1 when it backtracks).

    ``projection`` is called as ``projection(z, *params)`` and ``prox`` as
    ``prox(z, step, *params)``, so constraint sets and regularization strengths can be
    differentiated too.

    Args:
        f: Objective, a scalar per batch element (shape ``z0``'s batch shape).
        z0: Initial point (tensor or pytree).
        *params: Differentiated parameters.
        solver: Default :class:`LBFGS`.
        adjoint: Gradient mode (default :class:`ImplicitAdjoint`).
        throw: Raise :class:`ConvergenceError` if any batch element fails.
        batch_ndim: Leading dimensions indexing independent problems.
        callback: Called as ``callback(iteration, residual)``.

    Returns:
        :class:`Result`; ``residual`` is ‖∇f‖₂ or the gradient-mapping norm.

    Example:
        >>> import torch
        >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> r = minimize(lambda z, lam: ((z - 3) ** 2).sum() + lam * (z ** 2).sum(),
        ...              torch.zeros(2, dtype=torch.float64), lam)
        >>> r.solution
        tensor([1.5000, 1.5000], dtype=torch.float64, grad_fn=<ViewBackward0>)
    """
    solver = LBFGS() if solver is None else solver
    if not hasattr(solver, "run_minimize"):
        raise ValueError(f"solver must be GradientDescent, LBFGS, ProjectedGradient or ProximalGradient, "
                         f"got {type(solver).__name__}")
    projection = getattr(solver, "projection", None) if isinstance(solver, ProjectedGradient) else None
    prox = getattr(solver, "prox", None) if isinstance(solver, ProximalGradient) else None
    constrained = projection is not None or prox is not None
    step = getattr(solver, "step", None)
    eta = float(step) if isinstance(step, (int, float)) and step > 0 else 1.0

    def funcs(lay: Any, pt: Any) -> dict[str, Any]:
        out = {"f": _flat.per_element(f, lay, pt, "f")}
        if constrained:
            user: Any = projection if projection is not None else prox
            out["prox"] = _flat.with_step(user, lay, pt, "projection" if prox is None else "prox",
                                          uses_step=prox is not None)
        return out

    def optimality(lay: Any, pt: Any) -> Callable[..., torch.Tensor]:
        fs = funcs(lay, pt)
        ff = fs["f"].flat

        def grad(z: torch.Tensor, *leaves: Any) -> torch.Tensor:
            return torch.func.grad(lambda zz: ff(zz, *leaves).sum())(z)

        if not constrained:
            return grad
        pf = fs["prox"].flat
        return lambda z, *leaves: pf(z - eta * grad(z, *leaves), eta, *leaves) - z

    def runner(s: Any, fs: dict[str, Any], z: torch.Tensor) -> Result:
        if constrained:
            return s.run_minimize(fs["f"], z, prox=fs["prox"], callback=callback)
        return s.run_minimize(fs["f"], z, callback=callback)

    return solve(name=f"minimize({type(solver).__name__})", z0=z0, params=params, batch_ndim=batch_ndim,
                 make_funcs=funcs, make_optimality=optimality, runner=runner, solver=solver,
                 adjoint=adjoint, throw=throw, symmetric=not constrained)

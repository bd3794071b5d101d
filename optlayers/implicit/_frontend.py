"""What ``root_solve``, ``fixed_point``, ``minimize`` and ``least_squares`` share.

Each front-end states (1) the user functions its solver calls, (2) the optimality condition that
defines the solution for gradients, and (3) how to run the solver on flat callables. This module
flattens the user's pytrees, builds a :class:`FrontSpec` for the implicit primitive (or runs the
solver under autograd for :class:`UnrollAdjoint`), and applies the ``throw`` policy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._result import Result, raise_if_failed
from ._root_function import RootSpec, implicit_root, vmap_flat
from ._tree import Layout, ParamTree
from .adjoints import Adjoint, ImplicitAdjoint, OneStepAdjoint, UnrollAdjoint, resolve_adjoint

__all__ = ["FrontSpec", "UserFn", "solve"]

Runner = Callable[[dict[str, Callable[..., Any]], torch.Tensor], Result]


@dataclasses.dataclass(frozen=True)
class UserFn:
    """A user function made flat: ``flat(*lead, *leaves)`` where ``lead`` are per-element tensors."""

    flat: Callable[..., Any]
    n_lead: int = 1


@dataclasses.dataclass
class FrontSpec(RootSpec):
    """A generic solver driven by flat user functions; vectorized under vmap."""

    optimality: Callable[..., torch.Tensor]
    funcs: dict[str, UserFn]
    runner: Runner
    adjoint: ImplicitAdjoint | OneStepAdjoint
    symmetric: bool = False
    positive_definite: bool = False
    name: str = "solver"
    operator: Callable[..., torch.Tensor] | None = None  # symmetric stand-in for ∂_z F (GN mode)
    throw: bool = True
    solver: Any = None
    batch_shape: tuple[int, ...] = ()

    def fn(self, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return self.optimality(z, *inputs)

    def vjp_z(self, u: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        if self.operator is not None:
            return self.operator(u, z, *inputs)
        return super().vjp_z(u, z, *inputs)

    def jvp_z(self, w: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        if self.operator is not None:
            return self.operator(w, z, *inputs)
        return super().jvp_z(w, z, *inputs)

    def solve(self, z0: torch.Tensor, inputs: Sequence[Any]) -> Result:
        res = self.runner(bind(self.funcs, inputs), z0)
        if self.throw:  # checked here, on real tensors, so that it also works under vmap
            shaped = res
            if math.prod(self.batch_shape) == res.converged.shape[0]:
                shape = self.batch_shape
                shaped = res.replace(converged=res.converged.reshape(shape), residual=res.residual.reshape(shape),
                                     status=res.status.reshape(shape), iterations=res.iterations.reshape(shape))
            raise_if_failed(self.name, shaped, True, tol=_tol(self.solver, z0.dtype),
                            max_iter=getattr(self.solver, "max_iter", None))
        return res

    def vmapped(self, V: int, in_dims: Sequence[int | None]) -> FrontSpec:
        funcs = {k: UserFn(vmap_flat(f.flat, V, in_dims, f.n_lead), f.n_lead) for k, f in self.funcs.items()}
        op = None if self.operator is None else vmap_flat(self.operator, V, in_dims, 2)
        return dataclasses.replace(self, optimality=vmap_flat(self.optimality, V, in_dims), funcs=funcs,
                                   operator=op)


def bind(funcs: dict[str, UserFn], inputs: Sequence[Any]) -> dict[str, Callable[..., Any]]:
    """Close the flat user functions over the parameter leaves."""
    return {k: (lambda f: (lambda *lead: f.flat(*lead, *inputs)))(f) for k, f in funcs.items()}


def solve(*, name: str, z0: Any, params: Sequence[Any], batch_ndim: int,
          make_funcs: Callable[[Layout, ParamTree], dict[str, UserFn]],
          make_optimality: Callable[[Layout, ParamTree], Callable[..., torch.Tensor]],
          runner: Callable[[Any, dict[str, Callable[..., Any]], torch.Tensor], Result],
          solver: Any, adjoint: Adjoint | str | None, throw: bool, symmetric: bool = False,
          make_operator: Callable[[Layout, ParamTree], Callable[..., torch.Tensor]] | None = None) -> Result:
    """Run a generic solver with the chosen adjoint and the throw policy.

    Args:
        name: Used in error messages.
        z0: Initial point (tensor or pytree).
        params: The differentiated parameters (pytrees).
        batch_ndim: Leading dimensions of independent problems.
        make_funcs: Builds the flat user functions the solver calls.
        make_optimality: Builds the flat optimality condition.
        runner: ``runner(solver_config, bound_funcs, z0_flat) -> flat Result``.
        solver: The solver config (its ``max_iter``/``rtol`` appear in messages).
        adjoint: Gradient mode.
        throw: Raise :class:`ConvergenceError` when any element fails.
        symmetric: ``∂_z F`` is symmetric (and positive definite at a minimum).
        make_operator: Optional symmetric stand-in for ``∂_z F`` (Gauss–Newton mode).
    """
    adj = resolve_adjoint(adjoint)
    layout = Layout(z0, batch_ndim)
    ptree = ParamTree(params)
    funcs = make_funcs(layout, ptree)
    z0f = layout.to_flat(z0)
    if isinstance(adj, UnrollAdjoint):
        res = _unroll(adj, solver, runner, bind(funcs, ptree.tensors), z0f)
    else:
        spec = FrontSpec(
            optimality=make_optimality(layout, ptree), funcs=funcs,
            runner=lambda f, z: runner(solver, f, z), adjoint=adj, symmetric=symmetric,
            positive_definite=symmetric, name=name,
            operator=None if make_operator is None else make_operator(layout, ptree),
            throw=throw, solver=solver, batch_shape=layout.batch_shape)
        res = implicit_root(spec, z0f.detach(), ptree.tensors)
    u = layout.unflatten_batch
    out: Result = Result(layout.from_flat(res.solution), u(res.converged), u(res.iterations), u(res.residual),
                 u(res.status))
    if isinstance(adj, UnrollAdjoint):
        raise_if_failed(name, out, throw, tol=_tol(solver, z0f.dtype), max_iter=getattr(solver, "max_iter", None))
    return out


def _tol(solver: Any, dtype: torch.dtype) -> float | str | None:
    """The solver's stopping tolerance as resolved for ``dtype`` (for messages).

    The generic solvers stop at ``residual ≤ atol + rtol · residual(z0)``: the message states
    both parts, since a warm start near the solution makes the relative part tiny.
    """
    if hasattr(solver, "tolerances"):
        rtol, atol = solver.tolerances(dtype)
        return f"atol + rtol·r(z0) = {atol:.1e} + {rtol:.1e}·r(z0) (warm-started near a solution? raise atol)"
    rtol = getattr(solver, "rtol", None)
    if rtol is None and hasattr(solver, "rtol"):
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
    return rtol


def _unroll(adj: UnrollAdjoint, solver: Any, runner: Callable[..., Result],
            funcs: dict[str, Callable[..., Any]], z0: torch.Tensor) -> Result:
    """Differentiate through the iterations, optionally truncated to the last ``truncate``."""
    if adj.steps is None and adj.truncate is None:
        return runner(solver, funcs, z0)
    steps = adj.steps if adj.steps is not None else solver.max_iter
    truncate = adj.truncate if adj.truncate is not None else steps
    fixed = {"check_every": None} if hasattr(solver, "check_every") else {}
    if steps > truncate:
        with torch.no_grad():
            head = runner(dataclasses.replace(solver, max_iter=steps - truncate, **fixed), funcs, z0)
        z0 = head.solution.detach()
    return runner(dataclasses.replace(solver, max_iter=truncate, **fixed), funcs, z0)

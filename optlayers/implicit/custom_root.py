"""Decorators that make any solver differentiable by the implicit function theorem."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._result import Result, Status
from ._root_function import RootSpec, implicit_root, vmap_flat
from ._tree import Layout, ParamTree
from .adjoints import Adjoint, ImplicitAdjoint, OneStepAdjoint, UnrollAdjoint, resolve_adjoint

__all__ = ["custom_root", "custom_fixed_point"]


@dataclasses.dataclass
class _UserSolverSpec(RootSpec):
    """A user-supplied solver; under vmap it is called once per vmapped slice."""

    optimality: Callable[..., torch.Tensor]
    run: Callable[[torch.Tensor, Sequence[Any]], Result]
    adjoint: ImplicitAdjoint | OneStepAdjoint
    symmetric: bool = False
    positive_definite: bool = False
    name: str = "custom_root"

    def fn(self, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return self.optimality(z, *inputs)

    def solve(self, z0: torch.Tensor, inputs: Sequence[Any]) -> Result:
        return self.run(z0, inputs)

    def vmapped(self, V: int, in_dims: Sequence[int | None]) -> _UserSolverSpec:
        run = self.run

        def looped(z0: torch.Tensor, inputs: Sequence[Any]) -> Result:
            z3 = z0.reshape(V, -1, z0.shape[-1])
            outs = []
            for v in range(V):
                sliced = [x[v] if d is not None else x for x, d in zip(inputs, in_dims)]
                outs.append(run(z3[v], sliced))
            return pytree.tree_map(lambda *xs: None if xs[0] is None else torch.stack(xs).flatten(0, 1), *outs)

        return dataclasses.replace(self, optimality=vmap_flat(self.optimality, V, in_dims), run=looped)


def _flat_optimality(fn: Callable[..., Any], layout: Layout, ptree: ParamTree) -> Callable[..., torch.Tensor]:
    def optimality(zf: torch.Tensor, *leaves: Any) -> torch.Tensor:
        out = fn(layout.from_flat(zf), *ptree.rebuild(leaves))
        try:
            return layout.to_flat(out)
        except RuntimeError as err:
            raise ValueError(
                "the optimality function must return a residual with the structure and shape of z "
                f"(batch shape {layout.batch_shape}, event shapes {layout.event_shapes})") from err

    return optimality


def _symmetry_tags(fn: Callable[..., Any]) -> tuple[bool, bool]:
    return bool(getattr(fn, "symmetric", False)), bool(getattr(fn, "positive_definite", False))


def custom_root(optimality_fn: Callable[..., Any], *, adjoint: Adjoint | str | None = None,
                batch_ndim: int = 0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``solver(z0, *params) -> z`` differentiable through ``optimality_fn(z, *params) = 0``.

    The decorated solver runs without building a graph. Gradients with respect to every
    floating-point tensor in ``params`` (tensors or pytrees of tensors) come from the implicit
    function theorem,

    .. math:: \\partial z^\\star / \\partial\\theta = -(\\partial_z F)^{-1} \\partial_\\theta F,

    with the adjoint system solved by ``adjoint.linear_solver`` (matrix-free). Reverse mode,
    forward mode, double backward and ``torch.func`` transforms (``vmap``, ``grad``,
    ``jacrev``, ``jacfwd``, ``hessian``) all work; under ``vmap`` a user solver is called once per
    vmapped slice (the generic solvers :func:`root_solve` & co. are called once for all).

    Args:
        optimality_fn: ``F(z, *params)``, zero at the solution; returns the structure of ``z``.
            A function tagged ``symmetric=True`` (e.g. :func:`stationarity`) lets ``Auto`` pick CG.
        adjoint: :class:`ImplicitAdjoint` (default), :class:`OneStepAdjoint` or
            :class:`UnrollAdjoint` (the solver then runs with autograd on).
        batch_ndim: Leading dimensions of ``z0`` (and of the parameters) that index
            independent problems.

    Returns:
        A decorator. The decorated solver returns what the solver returns (a tensor/pytree, or a
        :class:`Result` whose ``solution`` is differentiable).

    Example:
        >>> import torch
        >>> from optlayers.implicit import custom_root, stationarity
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> f = lambda z, lam: 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z ** 2).sum()
        >>> @custom_root(stationarity(f))
        ... def ridge(z0, lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=X.dtype), X.T @ y)
        >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> ridge(torch.zeros(3, dtype=torch.float64), lam).sum().backward()
    """
    adj = resolve_adjoint(adjoint)
    symmetric, positive_definite = _symmetry_tags(optimality_fn)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver)
        def wrapped(z0: Any, *params: Any) -> Any:
            if isinstance(adj, UnrollAdjoint):
                return solver(z0, *params)
            layout = Layout(z0, batch_ndim)
            ptree = ParamTree(params)
            aux_spec: dict[str, Any] = {}

            def run(z0f: torch.Tensor, leaves: Sequence[Any]) -> Result:
                with torch.no_grad():
                    out = solver(layout.from_flat(z0f), *ptree.rebuild(leaves))
                if isinstance(out, Result):
                    zf = layout.to_flat(out.solution)
                    aux_leaves, aux_spec["spec"] = pytree.tree_flatten(out.aux)
                    aux_spec["present"] = [isinstance(t, torch.Tensor) for t in aux_leaves]
                    aux_leaves = [t for t in aux_leaves if isinstance(t, torch.Tensor)]
                    B = zf.shape[0]
                    aux = tuple(t.reshape(B, *t.shape[batch_ndim:]) for t in aux_leaves)
                    flat = lambda t, dt: torch.as_tensor(t, device=zf.device).to(dt).reshape(B)  # noqa: E731
                    return Result(zf, flat(out.converged, torch.bool), flat(out.iterations, torch.int64),
                                  flat(out.residual, zf.dtype), flat(out.status, torch.int64), aux or None)
                zf = layout.to_flat(out)
                res = torch.linalg.vector_norm(optimality(zf, *leaves), dim=-1)
                ok = torch.isfinite(zf).all(-1) & torch.isfinite(res)
                status = (~ok).to(torch.int64) * int(Status.NONFINITE)
                return Result(zf, ok, torch.zeros_like(status), res, status)

            optimality = _flat_optimality(optimality_fn, layout, ptree)
            spec = _UserSolverSpec(optimality=optimality, run=run, adjoint=adj, symmetric=symmetric,
                                   positive_definite=positive_definite,
                                   name=f"custom_root({getattr(solver, '__name__', 'solver')})")
            res = implicit_root(spec, layout.to_flat(z0).detach(), ptree.tensors)
            z = layout.from_flat(res.solution)
            if not aux_spec:
                return z
            it = iter(t.reshape((*layout.batch_shape, *t.shape[1:])) for t in (res.aux or ()))
            aux = pytree.tree_unflatten([next(it) if p else None for p in aux_spec["present"]], aux_spec["spec"])
            u = layout.unflatten_batch
            return Result(z, u(res.converged), u(res.iterations), u(res.residual), u(res.status), aux)

        return wrapped

    return decorator


def custom_fixed_point(fixed_point_fn: Callable[..., Any], *, adjoint: Adjoint | str | None = None,
                       batch_ndim: int = 0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``solver(z0, *params) -> z`` differentiable through ``z = T(z, *params)``.

    Same as :func:`custom_root` with the optimality condition ``z − T(z, θ) = 0``, whose Jacobian
    ``I − ∂_z T`` is the operator of the adjoint system (symmetric positive definite when ``T`` is
    a gradient step on a convex objective with a small enough step, so ``CG`` applies).

    Example:
        >>> import torch
        >>> from optlayers.implicit import custom_fixed_point
        >>> T = lambda z, a: 0.5 * z + a
        >>> @custom_fixed_point(T)
        ... def solve(z0, a):
        ...     for _ in range(100):
        ...         z0 = T(z0, a)
        ...     return z0
        >>> a = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        >>> torch.autograd.grad(solve(torch.zeros(1, dtype=torch.float64), a).sum(), a)[0]
        tensor([2.], dtype=torch.float64)
    """

    def residual(z: Any, *params: Any) -> Any:
        return pytree.tree_map(torch.sub, z, fixed_point_fn(z, *params))

    for tag in ("symmetric", "positive_definite"):
        if hasattr(fixed_point_fn, tag):
            setattr(residual, tag, getattr(fixed_point_fn, tag))
    return custom_root(residual, adjoint=adjoint, batch_ndim=batch_ndim)

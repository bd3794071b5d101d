"""The one autograd primitive of optlayers: a solution of ``F(z, θ) = 0`` with implicit gradients.

Everything differentiable in optlayers that is not plain PyTorch goes through
:class:`ImplicitRoot`. A :class:`RootSpec` (a plain Python object, not a tensor) describes a
problem on flat batched tensors: its optimality function ``fn(z, *inputs)`` with ``z`` of shape
``(B, n)`` and how to ``solve`` it. The primitive

* runs ``solve`` without building a graph;
* in reverse mode solves the adjoint system ``(∂_z F)ᵀ u = ḡ`` by calling *itself* on a
  :class:`LinearSpec`, so the adjoint solve is again a differentiable, vmappable primitive and
  double backward is exact (the saved solution is the primitive's output, never a detached copy);
* in forward mode solves ``∂_z F ż = −∂_θ F θ̇`` the same way;
* under ``torch.func.vmap`` folds the vmapped dimension into the batch dimension ``B`` and calls
  the solver once (its ``vmap`` staticmethod), since solver loops stop on data-dependent tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._result import AdjointSolveError, Result, Status, failure_message
from .adjoints import ImplicitAdjoint, OneStepAdjoint
from .linear_solvers import LinearOperator

__all__ = ["RootSpec", "LinearSpec", "ImplicitRoot", "implicit_root", "vmap_flat"]


def _is_diff(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def jvp_via_vjp(f: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """``∂f · t`` from two reverse passes: the vjp ``v ↦ (∂f)ᵀ v`` is linear, its own vjp is ``∂f``.

    Used instead of forward mode so that implicit JVPs also run under
    ``torch.autograd.forward_ad`` (which does not nest) and for functions without forward rules.
    """
    out, vjp_fn = torch.func.vjp(f, *primals)[:2]
    vjp_vjp = torch.func.vjp(lambda v: vjp_fn(v), torch.zeros_like(out))[1]
    return vjp_vjp(tuple(tangents))[0]


def vmap_flat(fn: Callable[..., torch.Tensor], V: int, in_dims: Sequence[int | None],
              n_lead: int = 1) -> Callable[..., torch.Tensor]:
    """Vmap a flat function over a new leading dimension folded into the batch.

    ``fn(*lead, *inputs)`` takes ``n_lead`` per-element tensors of shape ``(B, ...)`` (or Python
    scalars) followed by ``inputs``. The returned function takes the lead tensors with shape
    ``(V*B, ...)`` and inputs whose vmapped dimension (``in_dims``) is already at 0, and returns
    ``(V*B, ...)``.
    """
    in_dims = tuple(in_dims)

    def folded(*args: Any) -> torch.Tensor:
        lead, inputs = args[:n_lead], args[n_lead:]
        lead3: list[Any] = []
        lead_dims: list[int | None] = []
        for t in lead:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                lead3.append(t.reshape(V, t.shape[0] // V, *t.shape[1:]))
                lead_dims.append(0)
            else:
                lead3.append(t)
                lead_dims.append(None)
        out = torch.func.vmap(fn, in_dims=(*lead_dims, *in_dims))(*lead3, *inputs)
        return out.reshape(-1, *out.shape[2:])

    return folded


class RootSpec:
    """Describes one implicit root problem on flat tensors (subclass and implement).

    Attributes:
        adjoint: :class:`ImplicitAdjoint` or :class:`OneStepAdjoint` used for gradients.
        symmetric: ``∂_z F`` is symmetric.
        positive_definite: ``∂_z F`` is symmetric positive definite.
        name: Used in error messages.
    """

    adjoint: ImplicitAdjoint | OneStepAdjoint
    symmetric: bool = False
    positive_definite: bool = False
    name: str = "implicit root"
    #: How many leading inputs are per-element tensors shaped like ``z`` (folded with it under vmap).
    n_lead_inputs: int = 0

    def fn(self, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """Optimality residual ``F(z, inputs)``, ``(B, n) -> (B, n)``; differentiable and vmappable."""
        raise NotImplementedError

    def solve(self, z0: torch.Tensor, inputs: Sequence[Any]) -> Result:
        """Solve without a graph; returns a flat Result (solution ``(B, n)``, flags ``(B,)``)."""
        raise NotImplementedError

    def vmapped(self, V: int, in_dims: Sequence[int | None]) -> RootSpec:
        """The same problem with a leading vmapped dimension of size ``V`` folded into ``B``."""
        raise NotImplementedError

    # -- derived operators --------------------------------------------------------------
    def vjp_z(self, u: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """``(∂_z F)ᵀ u``."""
        return torch.func.vjp(lambda zz: self.fn(zz, *inputs), z)[1](u)[0]

    def jvp_z(self, w: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """``∂_z F w`` (by the double-vjp trick, which also works inside ``torch.autograd.forward_ad``)."""
        return jvp_via_vjp(lambda zz: self.fn(zz, *inputs), (z,), (w,))


@dataclasses.dataclass
class LinearSpec(RootSpec):
    """The linear system ``A(rest) u = b`` as a root problem ``F(u, b, *rest) = A u − b``.

    ``matvec(u, *rest)`` and ``rmatvec(w, *rest)`` apply ``A`` and ``Aᵀ``; both are
    differentiable in ``rest``, so the solution is differentiable in ``b`` and ``rest``.
    """

    matvec: Callable[..., torch.Tensor]
    rmatvec: Callable[..., torch.Tensor]
    adjoint: ImplicitAdjoint
    symmetric: bool = False
    positive_definite: bool = False
    name: str = "adjoint linear solve"
    n_lead_inputs: int = 1
    fast_matvec: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None

    def fn(self, u: torch.Tensor, *inputs: Any) -> torch.Tensor:
        b, *rest = inputs
        return self.matvec(u, *rest) - b

    def vjp_z(self, u: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return self.rmatvec(u, *inputs[1:])

    def jvp_z(self, w: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return self.matvec(w, *inputs[1:])

    def solve(self, z0: torch.Tensor, inputs: Sequence[Any]) -> Result:
        b, *rest = inputs
        mv = self.fast_matvec(*rest) if self.fast_matvec is not None else (lambda u: self.matvec(u, *rest))
        op = LinearOperator(
            matvec=mv, rmatvec=lambda w: self.rmatvec(w, *rest), batch=b.shape[0], n=b.shape[-1],
            dtype=b.dtype, device=b.device, symmetric=self.symmetric,
            positive_definite=self.positive_definite)
        solver: Any = self.adjoint.linear_solver
        result = solver(op, b, x0=z0)
        if self.adjoint.throw and not bool(result.converged.all()):
            name = f"{self.name} ({type(solver).__name__})"
            raise AdjointSolveError(
                failure_message(name, result, tol=getattr(solver, "rtol", None))
                + " The implicit gradient needs this solve; try ridge=1e-8 on the linear solver, "
                "Dense() or GMRES(), or check that the forward solve converged.", result)
        return result

    def vmapped(self, V: int, in_dims: Sequence[int | None]) -> LinearSpec:
        rest_dims = tuple(in_dims[1:])
        return dataclasses.replace(
            self, matvec=vmap_flat(self.matvec, V, rest_dims), rmatvec=vmap_flat(self.rmatvec, V, rest_dims),
            fast_matvec=None)


def _adjoint_spec(spec: RootSpec, *, transpose: bool) -> LinearSpec:
    """The linear system of the adjoint (``transpose``: ``(∂_z F)ᵀ``) or tangent solve (``∂_z F``)."""
    adjoint = spec.adjoint
    assert isinstance(adjoint, ImplicitAdjoint)
    symmetric = spec.symmetric if adjoint.symmetric is None else adjoint.symmetric
    fwd: Callable[..., torch.Tensor] = spec.vjp_z if transpose else spec.jvp_z
    bwd: Callable[..., torch.Tensor] = spec.jvp_z if transpose else spec.vjp_z

    def matvec(u: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return fwd(u, z, *inputs)

    def rmatvec(w: torch.Tensor, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return bwd(w, z, *inputs)

    fast = None
    if transpose and not isinstance(spec, LinearSpec) and getattr(spec, "operator", None) is None:
        def fast(z: torch.Tensor, *inputs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
            vjp_fn = torch.func.vjp(lambda zz: spec.fn(zz, *inputs), z)[1]
            return lambda u: vjp_fn(u)[0]

    return LinearSpec(matvec=matvec, rmatvec=rmatvec, adjoint=adjoint, symmetric=symmetric,
                      positive_definite=spec.positive_definite and symmetric,
                      name=f"{'adjoint' if transpose else 'tangent'} solve of {spec.name}",
                      fast_matvec=fast)


def _linear_solve(spec: RootSpec, rhs: torch.Tensor, z: torch.Tensor, inputs: Sequence[Any],
                  *, transpose: bool) -> torch.Tensor:
    """Solve ``(∂_z F)ᵀ u = rhs`` (or ``∂_z F u = rhs``) as a differentiable primitive."""
    if isinstance(spec.adjoint, OneStepAdjoint):  # ∂_z F taken as the identity
        return rhs
    lin = _adjoint_spec(spec, transpose=transpose)
    return ImplicitRoot.apply(lin, torch.zeros_like(rhs), rhs, z, *inputs)[0]


class ImplicitRoot(torch.autograd.Function):
    """``z* = solve(z0, inputs)`` with ``spec.fn(z*, *inputs) = 0``, differentiated implicitly.

    Outputs: ``(z (B, n), converged (B,), iterations (B,), residual (B,), status (B,), *aux)``;
    only ``z`` is differentiable.
    """

    @staticmethod
    def forward(spec: RootSpec, z0: torch.Tensor, *inputs: Any) -> tuple[torch.Tensor, ...]:
        result = spec.solve(z0, inputs)
        aux = tuple(result.aux) if isinstance(result.aux, tuple) else ()
        outs = (result.solution, result.converged, result.iterations, result.residual, result.status, *aux)
        # A solver may hand back an input unchanged (z0 already a solution, an aux that is a
        # parameter): autograd cannot save an input returned as-is, so such outputs are copied.
        given = [t for t in (z0, *inputs) if isinstance(t, torch.Tensor)]
        return tuple(o.clone() if isinstance(o, torch.Tensor) and any(o is t for t in given) else o
                     for o in outs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        spec, _z0, *params = inputs
        ctx.spec = spec
        ctx.n_aux = len(output) - 5
        ctx.set_materialize_grads(False)
        tensors = [p if isinstance(p, torch.Tensor) else None for p in params]
        ctx.param_is_tensor = [t is not None for t in tensors]
        ctx.static = [None if isinstance(p, torch.Tensor) else p for p in params]
        ctx.save_for_backward(output[0], *[t for t in tensors if t is not None])
        ctx.save_for_forward(output[0], *[t for t in tensors if t is not None])
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def _inputs(ctx: Any, saved: Sequence[torch.Tensor]) -> list[Any]:
        it = iter(saved)
        return [next(it) if is_t else s for is_t, s in zip(ctx.param_is_tensor, ctx.static)]

    @staticmethod
    def backward(ctx: Any, gz: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
        spec: RootSpec = ctx.spec
        z, *saved = ctx.saved_tensors
        inputs = ImplicitRoot._inputs(ctx, saved)
        n_in = len(inputs)
        if gz is None:
            return (None, None, *([None] * n_in))
        u = _linear_solve(spec, gz, z, inputs, transpose=True)
        diff_idx = [i for i, x in enumerate(inputs) if _is_diff(x) and ctx.needs_input_grad[i + 2]]
        grads: list[Any] = [None] * n_in
        if diff_idx:
            def f_params(*ps: torch.Tensor) -> torch.Tensor:
                full = list(inputs)
                for i, p in zip(diff_idx, ps):
                    full[i] = p
                return spec.fn(z, *full)

            vjp_fn = torch.func.vjp(f_params, *[inputs[i] for i in diff_idx])[1]
            # The gradient is -(∂_θ F)ᵀ u: the cotangent is negated (linear, exact in floating
            # point) rather than every parameter gradient, which may be much larger than u.
            for i, g in zip(diff_idx, vjp_fn(-u)):
                grads[i] = g
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _spec_t: Any, _z0_t: Any, *tangents: Any) -> tuple[Any, ...]:
        spec: RootSpec = ctx.spec
        z, *saved = ctx.saved_tensors
        inputs = ImplicitRoot._inputs(ctx, saved)
        idx = [i for i, (x, t) in enumerate(zip(inputs, tangents)) if _is_diff(x) and t is not None]
        n_out = 5 + ctx.n_aux
        if not idx:
            return (torch.zeros_like(z), *([None] * (n_out - 1)))

        def f_params(*ps: torch.Tensor) -> torch.Tensor:
            full = list(inputs)
            for i, p in zip(idx, ps):
                full[i] = p
            return spec.fn(z, *full)

        rhs = jvp_via_vjp(f_params, [inputs[i] for i in idx], [tangents[i] for i in idx])
        dz = -_linear_solve(spec, rhs, z, inputs, transpose=False)
        return (dz, *([None] * (n_out - 1)))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], spec: RootSpec, z0: torch.Tensor,
             *inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[int | None, ...]]:
        V = info.batch_size
        z0_dim, in_dims_inputs = in_dims[1], in_dims[2:]
        z0 = z0.expand(V, *z0.shape) if z0_dim is None else z0.movedim(z0_dim, 0)
        z0 = z0.reshape(-1, z0.shape[-1])
        moved = []
        dims: list[int | None] = []
        for k, (x, d) in enumerate(zip(inputs, in_dims_inputs)):
            if k < spec.n_lead_inputs:  # per-element like z: fold into the batch
                x = x.expand(V, *x.shape) if d is None else x.movedim(d, 0)
                moved.append(x.reshape(-1, *x.shape[2:]))
                dims.append(None)
            elif d is None or not isinstance(x, torch.Tensor):
                moved.append(x)
                dims.append(None)
            else:
                moved.append(x.movedim(d, 0))
                dims.append(0)
        new_spec = spec.vmapped(V, dims)
        outs = ImplicitRoot.apply(new_spec, z0, *moved)
        outs = tuple(o.reshape(V, -1, *o.shape[1:]) for o in outs)
        return outs, tuple(0 for _ in outs)


def implicit_root(spec: RootSpec, z0: torch.Tensor, inputs: Sequence[Any]) -> Result:
    """Apply :class:`ImplicitRoot` and pack its outputs into a flat :class:`Result`."""
    z, conv, iters, res, status, *aux = ImplicitRoot.apply(spec, z0, *inputs)
    return Result(solution=z, converged=conv, iterations=iters, residual=res, status=status,
                  aux=tuple(aux) if aux else None)


def nonfinite_result(z0: torch.Tensor) -> Result:
    """A NONFINITE result shaped like ``z0`` (used when the inputs already hold NaN/inf)."""
    B = z0.shape[0]
    return Result(solution=z0, converged=torch.zeros(B, dtype=torch.bool, device=z0.device),
                  iterations=torch.zeros(B, dtype=torch.int64, device=z0.device),
                  residual=torch.full((B,), float("nan"), dtype=z0.dtype, device=z0.device),
                  status=torch.full((B,), int(Status.NONFINITE), dtype=torch.int64, device=z0.device))

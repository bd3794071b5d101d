"""Entropic optimal transport by log-domain Sinkhorn, with a choice of gradients.

The problem (balanced, ``ρ = ∞``; KL-relaxed marginals with strengths ``ρ_a, ρ_b`` otherwise):

.. math::
    \\mathrm{OT}_\\varepsilon(a, b) = \\min_{P \\ge 0}\\ \\langle C, P\\rangle
        + \\varepsilon\\,\\mathrm{KL}(P \\,\\|\\, a \\otimes b)
        + \\rho_a \\mathrm{KL}(P\\mathbf 1 \\,\\|\\, a) + \\rho_b \\mathrm{KL}(P^\\top\\mathbf 1 \\,\\|\\, b),

solved in the dual over potentials ``(f, g)`` with ``P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)``.

Gradients (``gradient=``):

* :class:`Envelope` (default) — the value is the dual objective evaluated at the optimal
  potentials held fixed (Danskin), so ``∂OT/∂C = P``, ``∂OT/∂a = f``, ``∂OT/∂ε = KL(P‖a⊗b)``,
  and gradients to points go through the cost. One streamed pass; no linear solve (on a
  squared-Euclidean :class:`PointCloud` the value, ``⟨C, P⟩`` and the gradients all come from one
  fused transport-apply, see ``_envelope.py``). Exact first derivatives of ``value``;
  the potentials, the plan and ``transport_cost`` are returned
  detached, and second derivatives need :class:`Implicit`.
* :class:`Implicit` — the potentials are differentiated by the implicit function theorem
  through the Sinkhorn fixed point (:func:`optlayers.solvers.ot.dual.optimality`), the adjoint
  system solved matrix-free (the plan is applied as an operator) by
  :func:`optlayers.implicit.custom_root`. Exact first and second derivatives of the value, the
  potentials, the plan and the transport cost. On an online squared-Euclidean point cloud the
  first backward keeps ``O(n + m)`` memory: the soft-min's vector-Jacobian product applies the
  plan as an operator (``_online_softmin.py``) and ``⟨C, P⟩`` is differentiated block by block.
* :class:`Unroll` — backpropagate through every iteration (for comparison; memory grows with
  the iteration count).

References:
    Cuturi, "Sinkhorn Distances", NeurIPS 2013. Peyré & Cuturi, "Computational Optimal
    Transport", 2019. Séjourné, Feydy, Vialard, Trouvé, Peyré, "Sinkhorn Divergences for
    Unbalanced Optimal Transport", 2019. Cuturi et al., "Optimal Transport Tools (OTT)", 2022.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..._result import Result, raise_if_failed, register_aux
from ...implicit import ImplicitAdjoint, custom_root
from ...implicit.linear_solvers import Auto, LinearSolver, resolve_linear_solver
from ._envelope import envelope_value
from ._iterations import AndersonAcceleration, Anneal, default_tol, solve_potentials
from .dual import dual_value, optimality
from .geometry import Geometry, as_geometry
from .plan import TransportPlan

__all__ = ["sinkhorn", "Envelope", "Implicit", "Unroll", "Gradient", "SinkhornAux"]


@dataclasses.dataclass(frozen=True)
class Envelope:
    """Envelope (Danskin) gradients of the OT value: no linear solve, one streamed pass.

    The value is the dual objective ``D(f, g; C, a, b, ε)`` at the optimal potentials, which
    are held fixed; by Danskin's theorem its derivatives are the partial derivatives of ``D``:

    .. math::
        \\frac{\\partial \\mathrm{OT}_\\varepsilon}{\\partial C} = P, \\qquad
        \\frac{\\partial \\mathrm{OT}_\\varepsilon}{\\partial a} = f, \\qquad
        \\frac{\\partial \\mathrm{OT}_\\varepsilon}{\\partial b} = g, \\qquad
        \\frac{\\partial \\mathrm{OT}_\\varepsilon}{\\partial \\varepsilon} = \\mathrm{KL}(P \\,\\|\\, a \\otimes b).

    Exact first derivatives of ``value`` only; potentials, plan and ``transport_cost`` are
    returned detached (use :class:`Implicit` for those and for second derivatives).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn, Envelope
        >>> C = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
        >>> res = sinkhorn(None, None, C, epsilon=0.1, gradient=Envelope())
        >>> res.aux.value.backward()                 # dOT/dC is the plan
        >>> torch.allclose(C.grad, res.aux.plan.to_dense(), atol=1e-6)
        True
    """


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit differentiation of the potentials through the Sinkhorn fixed point.

    With ``F(z, θ) = 0`` the Sinkhorn optimality condition in ``z = (f, g)``
    (:func:`optlayers.solvers.ot.dual.optimality`) and ``θ = (C, a, b, ε)``, the implicit
    function theorem gives

    .. math::
        \\frac{\\partial z^\\star}{\\partial \\theta}
            = -\\big(\\partial_z F\\big)^{-1} \\partial_\\theta F ,

    and backward solves the adjoint system ``(∂_z F)ᵀ u = ḡ`` matrix-free (the plan applied as
    an operator). Exact first and second derivatives of the value, the potentials, the plan and
    the transport cost.

    Args:
        linear_solver: Solver of the adjoint system (``Auto()`` default: dense LU for
            ``n + m ≤ 500``, else matrix-free GMRES; ``GMRES()``, ``Dense()``, ``BiCGStab()``).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn, Implicit, Unroll
        >>> C = torch.rand(4, 3, dtype=torch.float64)
        >>> def grad_f(gradient):                    # d(sum f)/dC
        ...     Cg = C.clone().requires_grad_()
        ...     f, g = sinkhorn(None, None, Cg, epsilon=0.1, tol=1e-12, gradient=gradient).solution
        ...     return torch.autograd.grad(f.sum(), Cg)[0]
        >>> torch.allclose(grad_f(Implicit()), grad_f(Unroll()), atol=1e-8)
        True
    """

    linear_solver: LinearSolver | str = dataclasses.field(default_factory=Auto)

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_solver", resolve_linear_solver(self.linear_solver))


@dataclasses.dataclass(frozen=True)
class Unroll:
    """Differentiate through the iterations (memory grows with the iteration count).

    Backpropagates through every log-domain update ``g ← softmin_ε(Cᵀ − f − ε log a)``,
    ``f ← softmin_ε(C − g − ε log b)`` as ordinary autograd ops: the derivative of the
    iterate actually returned (for comparison with :class:`Implicit`, which differentiates the
    exact fixed point).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn, Unroll
        >>> x = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
        >>> res = sinkhorn(None, None, torch.cdist(x, x) ** 2, epsilon=0.5, gradient="unroll")
        >>> res.aux.value.backward()
        >>> x.grad.shape
        torch.Size([6, 2])
    """


Gradient = Envelope | Implicit | Unroll
_GRADIENTS: dict[str, Callable[[], Gradient]] = {"envelope": Envelope, "implicit": Implicit, "unroll": Unroll}


def _resolve_gradient(gradient: Gradient | str) -> Gradient:
    if isinstance(gradient, (Envelope, Implicit, Unroll)):
        return gradient
    if isinstance(gradient, str) and gradient.lower() in _GRADIENTS:
        return _GRADIENTS[gradient.lower()]()
    raise ValueError(f"unknown gradient {gradient!r}; valid: Envelope(), Implicit(), Unroll() or "
                     f"one of {sorted(_GRADIENTS)}")


@register_aux
@dataclasses.dataclass(frozen=True)
class SinkhornAux:
    """Extras of :func:`sinkhorn`.

    Attributes:
        plan: The :class:`TransportPlan` operator.
        value: Regularized OT value ``OT_ε(a, b)`` (the dual objective), batch shape.
        transport_cost: ``⟨C, P⟩``, batch shape (detached under :class:`Envelope`).
        epsilon: The absolute ``ε`` used (after ``relative_epsilon``), batch shape.

    With ``P = diag(a e^{f/ε}) e^{−C/ε} diag(b e^{g/ε})``, ``value`` is the dual objective

    .. math::
        \\mathrm{OT}_\\varepsilon = \\langle a, f\\rangle + \\langle b, g\\rangle
            - \\varepsilon \\langle a \\otimes b, e^{(f \\oplus g - C)/\\varepsilon} - 1\\rangle

    (balanced case) and ``transport_cost = ⟨C, P⟩``, so ``value − transport_cost`` is the
    entropic term ``ε KL(P ‖ a ⊗ b)``, nonnegative.

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn
        >>> aux = sinkhorn(None, None, torch.rand(2, 5, 4, dtype=torch.float64), epsilon=0.1).aux
        >>> aux.value.shape, aux.plan.shape
        (torch.Size([2]), (2, 5, 4))
        >>> bool((aux.value >= aux.transport_cost - 1e-9).all())
        True
    """

    plan: TransportPlan
    value: torch.Tensor
    transport_cost: torch.Tensor
    epsilon: torch.Tensor


def _transforms_active() -> bool:
    return bool(torch._C._are_functorch_transforms_active())


def _same_storage(us: tuple[torch.Tensor, ...], vs: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``us`` are views of the same data as ``vs`` (e.g. their detached copies)."""
    if _transforms_active():
        return False
    try:
        return all(u.data_ptr() == v.data_ptr() and u.shape == v.shape and u.stride() == v.stride()
                   and u.dtype == v.dtype for u, v in zip(us, vs, strict=True))
    except (RuntimeError, ValueError):  # wrapped tensors (functorch) have no storage
        return False


def _weights(w: torch.Tensor | None, mask: torch.Tensor | None, batch: tuple[int, ...], size: int,
             dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    if w is None:
        base = torch.ones(*batch, size, dtype=dtype, device=device)
        if mask is not None:
            base = base * mask.to(dtype)
        return base / base.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of shape (*batch, {size}) or None")
    if w.shape[-1] != size:
        raise ValueError(f"{name} has {w.shape[-1]} entries, the geometry has {size}")
    w = torch.broadcast_to(w.to(dtype), (*batch, size))
    if mask is not None:
        w = torch.where(mask, w, torch.zeros_like(w))
    if not _transforms_active() and bool((w < 0).any()):
        raise ValueError(f"{name} must be nonnegative")
    return w


def sinkhorn(a: torch.Tensor | None, b: torch.Tensor | None, geometry: Geometry | torch.Tensor, *,
             epsilon: float | torch.Tensor, relative_epsilon: bool = False,
             rho_a: float | None = None, rho_b: float | None = None,
             mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None,
             tol: float | None = None, max_iter: int = 10_000, anneal: Anneal | None = None,
             acceleration: AndersonAcceleration | None = None,
             init: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
             gradient: Gradient | str = Envelope(), check_every: int | None = 1,
             callback: Callable[[int, torch.Tensor], None] | None = None,
             symmetric: bool = False, throw: bool = True) -> Result[SinkhornAux]:
    """Solve entropic OT between ``a`` and ``b`` by log-domain Sinkhorn.

    Stops when the L1 marginal error ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` (for unbalanced problems: the
    same quantity for the fixed-point residual of the scalings) is at most ``tol``, per problem
    of the batch; converged problems are frozen while the others continue.

    Args:
        a: Source weights ``(*batch, n)`` (nonnegative; zeros allowed) or None (uniform).
        b: Target weights ``(*batch, m)`` or None. Balanced problems need equal masses.
        geometry: A cost tensor ``(*batch, n, m)``, a :class:`CostMatrix` or a :class:`PointCloud`.
        epsilon: Entropic regularization: a float or a tensor of the batch shape
            (differentiable). Absolute unless ``relative_epsilon``.
        relative_epsilon: Multiply ``epsilon`` by the mean cost over pairs of positive weight
            (computed without gradient).
        rho_a, rho_b: KL marginal relaxation strengths (None: hard marginal constraint). With
            GeomLoss's ``reach``, ``ρ = reach^p``.
        mask_a, mask_b: Bool padding masks ``(*batch, n)``/``(*batch, m)``: False entries get
            zero weight (ragged sizes in one batch).
        tol: L1 marginal error tolerance; default ``1e-6`` (float64) / ``1e-4`` (float32).
        max_iter: Iterations over all annealing stages (each iteration: two soft-min passes).
        anneal: :class:`Anneal` ε-schedule (each stage runs to its own tolerance) or None.
        acceleration: :class:`AndersonAcceleration` or None.
        init: Warm start ``(f0, g0)`` (either may be None).
        gradient: :class:`Envelope` (default), :class:`Implicit` or :class:`Unroll` (or their
            lowercase names).
        check_every: Convergence check period (a host sync); None: exactly ``max_iter``
            iterations without synchronisation.
        callback: ``callback(iteration, residual)`` after every iteration.
        symmetric: Declare ``a = b`` and ``C = Cᵀ`` (e.g. ``OT(a, a)`` in a divergence): use the
            averaged symmetric update with one soft-min per iteration, which converges much
            faster on such problems. The result is the same fixed point (``f = g``).
        throw: Raise :class:`ConvergenceError` when a problem does not converge.

    Returns:
        :class:`Result` with ``solution = (f, g)`` (``(*batch, n)``, ``(*batch, m)``; balanced
        potentials normalized by ``⟨a, f⟩ = ⟨b, g⟩``), ``residual`` the L1 marginal error, and
        ``aux`` a :class:`SinkhornAux` (``plan``, ``value``, ``transport_cost``, ``epsilon``).

    Raises:
        ConvergenceError: ``throw`` and a problem did not reach ``tol`` (or met NaN/inf).
        ValueError: Invalid shapes, negative weights, unequal masses in a balanced problem.

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn, PointCloud
        >>> x = torch.rand(50, 2, dtype=torch.float64, requires_grad=True)
        >>> y = torch.rand(40, 2, dtype=torch.float64)
        >>> res = sinkhorn(None, None, PointCloud(x, y), epsilon=0.05)
        >>> res.aux.value.backward()          # envelope gradient: x.grad = ∇_x OT_ε
        >>> float(res.residual) <= 1e-6
        True
    """
    geom = as_geometry(geometry)
    grad_mode = _resolve_gradient(gradient)
    if anneal is not None and not isinstance(anneal, Anneal):
        raise ValueError(f"anneal must be an Anneal or None, got {anneal!r}")
    if acceleration is not None and not isinstance(acceleration, AndersonAcceleration):
        raise ValueError(f"acceleration must be an AndersonAcceleration or None, got {acceleration!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
    for name, rho in (("rho_a", rho_a), ("rho_b", rho_b)):
        if rho is not None and not rho > 0:
            raise ValueError(f"{name} must be positive or None, got {rho}")
    batch, n, m = geom.batch_shape, geom.n, geom.m
    if symmetric and (n != m or (rho_a != rho_b)):
        raise ValueError("symmetric=True needs a square geometry, a == b and rho_a == rho_b")
    dtype, device = geom.dtype, geom.device
    B = geom.B
    tol_ = default_tol(dtype, tol)

    aw = _weights(a, mask_a, batch, n, dtype, device, "a")
    bw = _weights(b, mask_b, batch, m, dtype, device, "b")
    flat = geom.rebuild(tuple(t.reshape(B, *t.shape[len(batch):]) for t in geom.tensors()))
    if type(flat) is type(geom) and hasattr(geom, "_cache") and not getattr(geom, "_is_t", True):
        # the stored (flat, detached) cost is the same for both: build it once
        flat._cache = geom._cache  # type: ignore[attr-defined]
    af, bf = aw.reshape(B, n), bw.reshape(B, m)
    if rho_a is None and rho_b is None and not _transforms_active():
        gap = (af.sum(-1) - bf.sum(-1)).abs()
        if bool((gap > 0.5 * tol_).any()):
            raise ValueError(
                f"balanced OT needs sum(a) == sum(b); the masses differ by {float(gap.max()):.3e} "
                "(more than tol/2). Normalize the weights or relax the marginals with rho_a/rho_b.")
    eps = torch.as_tensor(epsilon, dtype=dtype, device=device)
    eps = torch.broadcast_to(eps, batch).reshape(B)
    if relative_epsilon:
        scale = flat.reduce_cost(af.detach(), bf.detach(), "mean").detach()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        eps = eps * scale
    if not _transforms_active() and bool((eps <= 0).any()):
        raise ValueError("epsilon must be positive")

    f0 = g0 = None
    if init is not None:
        f0, g0 = init
    opts: dict[str, Any] = dict(rho_a=rho_a, rho_b=rho_b, tol=tol_, max_iter=max_iter, anneal=anneal,
                                acceleration=acceleration, check_every=check_every, callback=callback,
                                symmetric=symmetric)

    def warm(gm: Geometry, f_init: torch.Tensor | None, g_init: torch.Tensor | None, e: torch.Tensor,
             bb: torch.Tensor) -> torch.Tensor | None:
        if f_init is not None:
            return f_init
        if g_init is not None:
            from .plan import safe_log
            return gm.softmin(g_init + e[:, None] * safe_log(bb), e, axis=1)
        return None

    if isinstance(grad_mode, Unroll):
        fi = None if f0 is None else f0.reshape(B, n).to(dtype)
        gi = None if g0 is None else g0.reshape(B, m).to(dtype)
        res = solve_potentials(flat, af, bf, eps, f0=warm(flat, fi, gi, eps, bf), **opts)
        f, g = res.solution
    else:
        has_f, has_g = f0 is not None, g0 is not None
        z0 = (torch.zeros(B, n, dtype=dtype, device=device) if f0 is None else f0.reshape(B, n).to(dtype),
              torch.zeros(B, m, dtype=dtype, device=device) if g0 is None else g0.reshape(B, m).to(dtype))

        def opt_fn(z: tuple[torch.Tensor, torch.Tensor], gts: tuple[torch.Tensor, ...], aa: torch.Tensor,
                   bb: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return optimality(flat.rebuild(gts), z[0], z[1], aa, bb, e, rho_a, rho_b)

        def solver(z: tuple[torch.Tensor, torch.Tensor], gts: tuple[torch.Tensor, ...], aa: torch.Tensor,
                   bb: torch.Tensor, e: torch.Tensor) -> Result:
            gm = flat.rebuild(gts) if gts[0] is not flat.tensors()[0] else flat
            if gm is not flat and hasattr(flat, "_cache") and _same_storage(gts, flat.tensors()):
                # detached views of the same tensors: share the stored (detached) cost
                gm._cache = flat._cache  # type: ignore[attr-defined]
            f_start = warm(gm, z[0] if has_f else None, z[1] if has_g else None, e, bb)
            r = solve_potentials(gm, aa, bb, e, f0=f_start, **opts)
            if throw:  # raised here, on concrete tensors, so that it also works under vmap
                shaped: Result[Any] = Result(r.solution, r.converged.reshape(batch), r.iterations.reshape(batch),
                                r.residual.reshape(batch), r.status.reshape(batch))
                raise_if_failed("sinkhorn", shaped, True, tol=tol_, max_iter=max_iter)
            return r

        implicit = isinstance(grad_mode, Implicit)
        adjoint = ImplicitAdjoint(linear_solver=grad_mode.linear_solver if isinstance(grad_mode, Implicit) else Auto())
        params: tuple[Any, ...] = (flat.tensors(), af, bf, eps)
        if not implicit:
            params = tuple(torch.utils._pytree.tree_map(lambda t: t.detach(), params))
            z0 = (z0[0].detach(), z0[1].detach())
        res = custom_root(opt_fn, adjoint=adjoint, batch_ndim=1)(solver)(z0, *params)
        f, g = res.solution
        if not implicit:
            f, g = f.detach(), g.detach()

    # envelope on a squared-Euclidean cloud: value, gradients and <C, P> from one fused pass
    fused = envelope_value(flat, f, g, af, bf, eps, rho_a, rho_b) if isinstance(grad_mode, Envelope) else None
    value = fused[0] if fused is not None else dual_value(flat, f, g, af, bf, eps, rho_a, rho_b)
    fb, gb = f.reshape(*batch, n), g.reshape(*batch, m)
    eps_b = eps.reshape(batch)
    plan = TransportPlan(geom, fb, gb, aw, bw, eps_b)
    if fused is not None:
        tcost = fused[1].reshape(batch)
    elif isinstance(grad_mode, Envelope):
        with torch.no_grad():
            tcost = plan.transport_cost()
    else:
        tcost = plan.transport_cost()
    aux = SinkhornAux(plan=plan, value=value.reshape(batch), transport_cost=tcost, epsilon=eps_b)
    out: Result[SinkhornAux] = Result(
        (fb, gb), res.converged.reshape(batch), res.iterations.reshape(batch),
        res.residual.reshape(batch), res.status.reshape(batch), aux)
    if isinstance(grad_mode, Unroll):
        raise_if_failed("sinkhorn", out, throw, tol=tol_, max_iter=max_iter)
    return out


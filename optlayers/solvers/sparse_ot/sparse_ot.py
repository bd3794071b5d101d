r"""Sparsity-constrained and quadratically regularized optimal transport, differentiable.

The problem (Liu, Puigcerver & Blondel 2023; ``k = None`` is Blondel, Seguy & Rolet 2018):

.. math::

    \min_{P \in U(a, b)}\ \langle C, P\rangle + \frac{\gamma}{2}\lVert P\rVert_F^2
    \quad\text{s.t.}\quad \lVert P_{:, j}\rVert_0 \le k\ \ \forall j
    \qquad (\text{or } \lVert P_{i, :}\rVert_0 \le k\ \forall i \text{ for } \texttt{sparsity="row"}),

``U(a, b) = {P ≥ 0, P1 = a, Pᵀ1 = b}``; ``γ`` is POT's ``reg`` with ``reg_type="l2"``. It is
solved through its concave *semi-dual* (default; potentials of the unconstrained side, the
constrained side's marginal met exactly) or *dual* (both potentials; with L-BFGS warm-started from
the semi-dual solution) by L-BFGS (:class:`DualLBFGS`) or fixed-iteration Adam
(:class:`DualAdam`); the inner maximisations are
``k``-sparse simplex projections (semi-dual) or top-``k`` selections (dual), run by the
``"sparse_simplex_projection"`` kernel (Numba on CPU, Triton on CUDA). On CPU, L-BFGS runs as a
single compiled call (kernel ``"sparse_ot_dual_lbfgs"``: the same iteration with the value and
gradient fused into one pass over the cost, no per-iteration PyTorch operations); see
:class:`DualLBFGS`.

Limits: ``k = 1`` (with ``γ → 0`` for the dual) gives unregularized OT when a ``1``-sparse plan
is feasible (e.g. assignment problems); ``k ≥`` the support of the quadratically regularized
solution gives exactly quadratically regularized OT (:func:`quadratic_ot`). In between, the
primal is nonconvex and the dual solution may violate the unconstrained side's marginal: the
violation is reported in ``residual`` and ``aux.marginal_violation`` (never hidden), and the
solver stops when the dual stops improving (see :mod:`._optim`).

Gradients (with respect to ``C``, ``a``, ``b`` and ``γ``): the potentials are differentiated
implicitly through the dual optimality condition ``∇D = 0`` (gauge-fixed; see
:func:`.semi_dual.semi_dual_optimality`, :func:`.dual.dual_optimality`), the adjoint system
solved by MINRES; the plan values are recomputed from them on the support with PyTorch operations,
so ``aux.plan``, ``aux.primal_value`` and ``aux.transport_cost`` have exact derivatives almost
everywhere. ``aux.value`` (the dual objective) uses the envelope theorem (``∂/∂C = P``).

References:
    Liu, Puigcerver, Blondel. Sparsity-Constrained Optimal Transport. ICLR 2023.
    Blondel, Seguy, Rolet. Smooth and Sparse Optimal Transport. AISTATS 2018.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..._result import Result, Status, raise_if_failed, register_aux
from ...implicit import MINRES, ImplicitAdjoint, custom_root
from ...kernels import Backend, KernelUnavailableError, dispatch
from ...kernels.sparse_ot_dual import LBFGS_KERNEL_NAME
from ._optim import DualAdam, DualLBFGS, run_adam, run_lbfgs
from .dual import DualOracle, dual_optimality, dual_plan, dual_support, dual_value
from .plan import SparseTransportPlan
from .projection import project_topk_simplex
from .semi_dual import SemiDualOracle, semi_dual_optimality, semi_dual_plan, semi_dual_value

__all__ = ["sparse_ot", "quadratic_ot", "SparseOTAux", "DualLBFGS", "DualAdam"]

_FORMULATIONS = ("semi_dual", "dual")
_SPARSITY = ("column", "row")
_SOLVERS: dict[str, Callable[[], DualLBFGS | DualAdam]] = {"lbfgs": DualLBFGS, "adam": DualAdam}


@register_aux
@dataclasses.dataclass(frozen=True)
class SparseOTAux:
    r"""Extras of :func:`sparse_ot` (tensors of the batch shape unless said otherwise).

    For the returned plan :math:`P` and potentials :math:`(f, g)`,

    .. math::

        \text{primal\_value} = \langle C, P\rangle + \tfrac{\gamma}{2}\lVert P\rVert_F^2
        \;\ge\; \text{value} = D(f, g),
        \qquad \text{marginal\_violation} = \lVert P1 - a\rVert_1 + \lVert P^\top 1 - b\rVert_1,

    with equality of the first two (and no violation, up to ``tol``) when ``k`` does not bind.

    Attributes:
        plan: The :class:`SparseTransportPlan` (``to_dense()`` on request).
        value: The (semi-)dual objective at the solution — a lower bound on the primal optimum,
            equal to it when ``k`` does not bind; envelope gradients (``∂/∂C = P``).
        primal_value: ``⟨C, P⟩ + (γ/2)‖P‖²`` of the returned plan.
        transport_cost: ``⟨C, P⟩``.
        marginal_violation: ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` of the returned plan.
        max_nnz: Largest number of nonzeros of a column (``sparsity="row"``: of a row); ``<= k``.
        k: The cardinality bound used (``k`` clipped to the column length; that length for
            ``k=None``), int64.
        gamma: The regularization ``γ``.

    Example:
        With ``k=2`` nonzeros per column of a ``6 × 4`` plan the constraint binds: the dual value
        is a lower bound and a marginal violation remains (it is reported, not hidden):

        >>> import torch
        >>> from optlayers.solvers.sparse_ot import sparse_ot
        >>> C = torch.rand(6, 4, dtype=torch.float64)
        >>> aux = sparse_ot(None, None, C, k=2, gamma=0.1).aux
        >>> P = aux.plan.to_dense()
        >>> torch.allclose(aux.primal_value, (C * P).sum() + 0.05 * (P * P).sum())
        True
        >>> bool(aux.value <= aux.primal_value), int(aux.max_nnz), int(aux.k)
        (True, 2, 2)
        >>> r, c = aux.plan.marginals()
        >>> torch.allclose(aux.marginal_violation, (r - 1 / 6).abs().sum() + (c - 1 / 4).abs().sum())
        True
    """

    plan: SparseTransportPlan
    value: torch.Tensor
    primal_value: torch.Tensor
    transport_cost: torch.Tensor
    marginal_violation: torch.Tensor
    max_nnz: torch.Tensor
    k: torch.Tensor
    gamma: torch.Tensor


def _transforms_active() -> bool:
    return bool(torch._C._are_functorch_transforms_active())


def _resolve_solver(solver: DualLBFGS | DualAdam | str) -> DualLBFGS | DualAdam:
    if isinstance(solver, (DualLBFGS, DualAdam)):
        return solver
    if isinstance(solver, str) and solver.lower() in _SOLVERS:
        return _SOLVERS[solver.lower()]()
    raise ValueError(f"unknown solver {solver!r}; valid: DualLBFGS(), DualAdam() or one of {sorted(_SOLVERS)}")


def _weights(w: torch.Tensor | None, batch: tuple[int, ...], size: int, dtype: torch.dtype,
             device: torch.device, name: str) -> torch.Tensor:
    if w is None:
        return torch.full((*batch, size), 1.0 / size, dtype=dtype, device=device)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of shape (*batch, {size}) or None")
    if w.shape[-1] != size:
        raise ValueError(f"{name} has {w.shape[-1]} entries, the cost has {size}")
    try:
        w = torch.broadcast_to(w.to(dtype), (*batch, size))
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(w.shape)} does not broadcast to {(*batch, size)}") from None
    if not _transforms_active() and bool((w < 0).any()):
        raise ValueError(f"{name} must be nonnegative")
    return w


def _default_tol(dtype: torch.dtype, tol: float | None) -> float:
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"tol must be a positive float or None, got {tol!r}")
        return float(tol)
    return 1e-9 if dtype == torch.float64 else 1e-5


def _fused_lbfgs(K: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor,
                 backend: Backend | str | None) -> Callable[..., Any] | None:
    """The compiled whole-solve L-BFGS kernel where it applies, else None (PyTorch loop).

    It runs where the Numba backend is chosen (automatically for CPU problems of at least 4,096
    entries, or forced), for float32/float64 data with finite entries (non-finite data takes the
    PyTorch loop, which reports it per problem).
    """
    if K.device.type != "cpu" or K.dtype not in (torch.float32, torch.float64):
        return None
    if backend is not None and Backend.parse(backend) is not Backend.NUMBA:
        return None
    try:
        fn = dispatch(LBFGS_KERNEL_NAME, backend=backend, device=K.device, size=K.numel())
    except KernelUnavailableError:
        return None
    finite = torch.isfinite(K).all() & torch.isfinite(a).all() & torch.isfinite(b).all() & torch.isfinite(gamma).all()
    return fn if bool(finite) else None


def sparse_ot(a: torch.Tensor | None, b: torch.Tensor | None, C: torch.Tensor, *, k: int | None,
              gamma: float | torch.Tensor, sparsity: str = "column", formulation: str = "semi_dual",
              solver: DualLBFGS | DualAdam | str = "lbfgs", tol: float | None = None,
              adjoint: ImplicitAdjoint | None = None, backend: Backend | str | None = None,
              callback: Callable[[int, torch.Tensor], None] | None = None,
              throw: bool = True) -> Result[SparseOTAux]:
    r"""Sparsity-constrained (``k``) quadratically regularized OT between ``a`` and ``b``.

    Minimises ``⟨C, P⟩ + (γ/2)‖P‖²`` over transport plans with at most ``k`` nonzeros in each
    column (``sparsity="column"``) or row (``"row"``); see the module docstring for the
    formulations, limits and gradients. For column sparsity the semi-dual maximised is

    .. math::

        \max_{f \in \mathbb R^n}\ \langle f, a\rangle - \sum_j
        \max_{t \in \Delta_{b_j},\ \lVert t\rVert_0 \le k}
        \Big[\langle t,\ f - C_{:, j}\rangle - \tfrac{\gamma}{2}\lVert t\rVert^2\Big],
        \qquad P_{:, j} = \Pi_{k, b_j}\big((f - C_{:, j})/\gamma\big),

    the inner maximiser being the ``k``-sparse projection onto the simplex of mass :math:`b_j`
    (:func:`sparse_simplex_projection`).

    Stopping test (per problem): the L1 marginal violation of the (semi-)dual gradient,
    ``‖P1 − a‖₁`` (semi-dual, column sparsity; ``‖Pᵀ1 − b‖₁`` for rows) or
    ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` (dual), is at most ``tol`` — or, where ``k`` binds, the dual
    objective stopped improving (the violation left is then the duality gap of the nonconvex
    problem, reported in ``residual``).

    Args:
        a: Row weights ``(*batch, n)`` (nonnegative) or None (uniform, ``1/n``).
        b: Column weights ``(*batch, m)`` or None (uniform). ``Σa = Σb`` is required.
        C: Cost ``(*batch, n, m)``; gradients flow to it.
        k: Maximum nonzeros per column (row), an int ``>= 1`` clipped to the column (row)
            length, or None (no constraint: quadratically regularized OT).
        gamma: ``γ > 0``, a float or a tensor of the batch shape (differentiable).
        sparsity: ``"column"`` (default) or ``"row"``.
        formulation: ``"semi_dual"`` (default; tighter when ``k`` binds) or ``"dual"``.
        solver: :class:`DualLBFGS` (default, ``"lbfgs"``) or :class:`DualAdam` (``"adam"``,
            fixed iterations, no host synchronisation).
        tol: L1 marginal-violation tolerance; default ``1e-9`` (float64) / ``1e-5`` (float32).
        adjoint: Gradient configuration (default ``ImplicitAdjoint(linear_solver=MINRES())``: the
            adjoint operator is symmetric positive semidefinite, singular for some supports).
        backend: Force the projection kernel's backend (``"reference"``, ``"numba"``,
            ``"triton"``); None chooses automatically.
        callback: ``callback(iteration, residual)`` after every iteration.
        throw: Raise :class:`ConvergenceError` when a problem fails (``MAX_ITER``, ``NONFINITE``,
            ``STAGNATION``).

    Returns:
        :class:`Result` with ``solution = (f, g)`` the potentials ``(*batch, n)``, ``(*batch, m)``
        (``P_ij = [f_i + g_j − C_ij]_+/γ`` on the support), ``residual`` the stopping violation,
        ``iterations`` (for the dual: semi-dual warm start plus dual stage), and ``aux`` a
        :class:`SparseOTAux`.

    Raises:
        ConvergenceError: ``throw`` and a problem did not converge.
        ValueError: invalid shapes, weights, ``k``, ``gamma`` or option names.

    Example:
        >>> import torch
        >>> C = torch.rand(8, 6, dtype=torch.float64, requires_grad=True)
        >>> res = sparse_ot(None, None, C, k=2, gamma=0.05)
        >>> bool((res.aux.plan.nnz() <= 2).all())
        True
        >>> res.aux.value.backward()   # envelope theorem: the gradient of the dual value is P
        >>> torch.allclose(C.grad, res.aux.plan.to_dense())
        True
        >>> C.grad = None
        >>> res.aux.transport_cost.backward()   # implicit gradient through the potentials
        >>> tuple(C.grad.shape)
        (8, 6)
    """
    if not isinstance(C, torch.Tensor) or C.dim() < 2 or not C.is_floating_point():
        raise ValueError(f"C must be a floating tensor of shape (*batch, n, m), got "
                         f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__}")
    if sparsity not in _SPARSITY:
        raise ValueError(f"unknown sparsity {sparsity!r}; valid: {_SPARSITY}")
    if formulation not in _FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; valid: {_FORMULATIONS}")
    cfg = _resolve_solver(solver)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an int >= 1 or None, got {k!r}")
    if adjoint is None:
        adjoint = ImplicitAdjoint(linear_solver=MINRES())
    if not isinstance(adjoint, ImplicitAdjoint):
        raise ValueError(f"adjoint must be an ImplicitAdjoint, got {adjoint!r}")
    batch = tuple(C.shape[:-2])
    n, m = C.shape[-2], C.shape[-1]
    if n < 1 or m < 1:
        raise ValueError(f"C must have at least one row and one column, got {tuple(C.shape)}")
    dtype, device = C.dtype, C.device
    B = math.prod(batch)
    tol_ = _default_tol(dtype, tol)
    aw = _weights(a, batch, n, dtype, device, "a")
    bw = _weights(b, batch, m, dtype, device, "b")
    if not _transforms_active():
        gap = (aw.sum(-1) - bw.sum(-1)).abs()
        if bool((gap > 0.5 * tol_ + 1e3 * torch.finfo(dtype).eps * aw.sum(-1)).any()):
            raise ValueError(f"sparse_ot needs sum(a) == sum(b); the masses differ by {float(gap.max()):.3e}")
    gam = torch.broadcast_to(torch.as_tensor(gamma, dtype=dtype, device=device), batch).reshape(B)
    if not _transforms_active() and not bool((gam > 0).all()):
        raise ValueError(f"gamma must be positive, got {gamma!r}")

    # canonical problem: the constrained lines are the rows of K (B, mc, nc)
    if sparsity == "column":
        K = C.transpose(-1, -2).reshape(B, m, n)
        a_c, b_c = aw.reshape(B, n), bw.reshape(B, m)
    else:
        K = C.reshape(B, n, m)
        a_c, b_c = bw.reshape(B, m), aw.reshape(B, n)
    mc, nc = K.shape[1], K.shape[2]
    kk = nc if k is None else min(k, nc)
    semi = formulation == "semi_dual"
    sync = isinstance(cfg, DualLBFGS) and cfg.check_every is not None and not _transforms_active()
    d = nc if semi else nc + mc
    # the fused dual kernel has no Triton version: a forced "triton" leaves it on automatic
    dual_backend = None if backend is None or Backend.parse(backend) is Backend.TRITON else Backend.parse(backend)
    state: dict[str, Any] = {"k_work": None}  # projection width of the optimality condition

    def make_oracle(Kx: torch.Tensor, ax: torch.Tensor, bx: torch.Tensor, gx: torch.Tensor,
                    adaptive: bool) -> SemiDualOracle | DualOracle:
        if semi:
            return SemiDualOracle(Kx, ax, bx, gx, kk, backend=backend, adaptive=adaptive)
        return DualOracle(Kx, ax, bx, gx, kk, backend=dual_backend)

    def opt_fn(z: torch.Tensor, Kx: torch.Tensor, ax: torch.Tensor, bx: torch.Tensor,
               gx: torch.Tensor) -> torch.Tensor:
        if semi:
            kw = kk if state["k_work"] is None else state["k_work"]
            return semi_dual_optimality(z, Kx, ax, bx, gx, kw, 1.0 / nc)
        return dual_optimality(z, Kx, ax, bx, gx, kk, 1.0 / (nc + mc))

    # ∂F is symmetric positive *semi*definite: singular where the support graph splits into
    # components or leaves rows uncovered (binding k), with consistent right-hand sides (the plan
    # is locally invariant along those directions) — MINRES handles that, CG may break down
    opt_fn.symmetric = True  # type: ignore[attr-defined]

    def solve(z0: torch.Tensor, Kx: torch.Tensor, ax: torch.Tensor, bx: torch.Tensor,
              gx: torch.Tensor) -> Result:
        Kx = Kx.contiguous()
        oracle = make_oracle(Kx, ax, bx, gx, sync)
        scale = Kx.abs().flatten(1).amax(-1).clamp_min(torch.finfo(Kx.dtype).tiny)
        mass = ax.sum(-1)
        if isinstance(cfg, DualLBFGS):
            ftol = cfg.ftol if cfg.ftol is not None else (1e-8 if Kx.dtype == torch.float64 else 1e-5)
            warm_iters = torch.zeros(z0.shape[0], dtype=torch.int64, device=z0.device)
            fused = _fused_lbfgs(Kx, ax, bx, gx, backend) if sync and callback is None else None

            def lbfgs(semi_: bool, orc: SemiDualOracle | DualOracle, zs: torch.Tensor,
                      cb: Callable[[int, torch.Tensor], None] | None) -> Result:
                if fused is not None:  # the same iteration, compiled: one call for the whole solve
                    zf, it, res_, st = fused(zs, Kx, ax, bx, gx, kk, semi=semi_, memory=cfg.memory,
                                             max_iter=cfg.max_iter, tol=tol_, ftol=ftol, window=cfg.window,
                                             fscale=scale * mass)
                    return Result(solution=zf, converged=st == 0, iterations=it, residual=res_, status=st)
                return run_lbfgs(orc, zs, cfg, tol=tol_, ftol=ftol, fscale=scale * mass, callback=cb)

            if not semi and sync:
                # warm start from the semi-dual, whose optimum (α, β = −γτ) is the dual's when k does
                # not bind (and close to it otherwise): far fewer iterations than from zero
                so = SemiDualOracle(Kx, ax, bx, gx, kk, backend=backend, adaptive=True)
                rs = lbfgs(True, so, z0[:, :nc], None)
                V, I = so.project(rs.solution)
                _, beta0 = semi_dual_plan(rs.solution, Kx, bx, gx, I, V > 0)
                ok = torch.isfinite(rs.solution).all(-1, keepdim=True) & torch.isfinite(beta0).all(-1, keepdim=True)
                z0 = torch.where(ok, torch.cat([rs.solution, beta0], dim=-1), z0)
                warm_iters = rs.iterations
            r = lbfgs(semi, oracle, z0, callback)
            r = r.replace(iterations=r.iterations + warm_iters)
        else:
            r = run_adam(oracle, z0, cfg, tol=tol_, lr=cfg.lr * scale, gscale=mass, callback=callback)
        if sync:
            # NaN data: the selection kernels skip NaN entries (comparisons are false), so a solve
            # may still end; it is reported, never returned as a solution
            nan = (torch.isnan(Kx).flatten(1).any(-1) | torch.isnan(ax).any(-1) | torch.isnan(bx).any(-1)
                   | torch.isnan(gx))
            if bool(nan.any()):
                r = r.replace(converged=r.converged & ~nan,
                              status=torch.where(nan, int(Status.NONFINITE), r.status))
        z = r.solution
        if semi:
            z = z - z.mean(-1, keepdim=True)
            if isinstance(oracle, SemiDualOracle) and sync:
                V, I = oracle.project(z)
                state["support"] = (z, V, I)  # reused for the plan below (same z, same projection)
                kw = min(kk, int((V > 0).sum(-1).max()) + 1)
                state["k_work"] = kw if state["k_work"] is None else max(state["k_work"], kw)
        else:
            c = (z[:, nc:].sum(-1) - z[:, :nc].sum(-1)) / (nc + mc)
            z = torch.cat([z[:, :nc] + c[:, None], z[:, nc:] - c[:, None]], dim=-1)
        r = r.replace(solution=z, aux=())
        if throw:  # raised here, on concrete tensors, so that it also works under vmap
            shaped: Result = Result(z, r.converged.reshape(-1), r.iterations.reshape(-1), r.residual.reshape(-1),
                            r.status.reshape(-1))
            raise_if_failed(f"sparse_ot ({formulation}, {type(cfg).__name__})", shaped, True, tol=tol_,
                            max_iter=cfg.max_iter)
        return r

    z0 = torch.zeros(B, d, dtype=dtype, device=device)
    res = custom_root(opt_fn, adjoint=adjoint, batch_ndim=1)(solve)(z0, K, a_c, b_c, gam)
    z = res.solution

    # support at the solution (no graph), then the plan recomputed differentiably on it
    with torch.no_grad():
        zd, Kd, gd = z.detach(), K.detach(), gam.detach()
        if semi:
            if _transforms_active():
                V, I = project_topk_simplex((zd[:, None, :] - Kd) / gd[:, None, None], kk, b_c.detach())
            elif "support" in state and state["support"][0].shape == zd.shape and torch.equal(state["support"][0], zd):
                _, V, I = state["support"]
            else:
                post = SemiDualOracle(Kd.contiguous(), a_c.detach(), b_c.detach(), gd, kk, backend=backend,
                                      adaptive=sync)
                V, I = post.project(zd)
            if sync:  # compact: support first, width = largest support
                V, order = torch.sort(V, dim=-1, descending=True)
                I = torch.gather(I, -1, order)
                w = max(1, int((V > 0).sum(-1).max()))
                V, I = V[..., :w], I[..., :w]
            support = V > 0
        else:
            I, support = dual_support(zd[:, :nc], zd[:, nc:], Kd, kk, sync)
    if semi:
        values, beta = semi_dual_plan(z, K, b_c, gam, I, support)
        alpha = z
        value = semi_dual_value(z.detach(), K, a_c, b_c, gam, I, support)
    else:
        alpha, beta = z[:, :nc], z[:, nc:]
        values = dual_plan(alpha, beta, K, gam, I, support)
        value = dual_value(alpha.detach(), beta.detach(), K, a_c, b_c, gam, I, support)
    Kg = torch.gather(K, 2, I)
    tcost = (values * Kg).sum((1, 2))
    primal = tcost + 0.5 * gam * (values * values).sum((1, 2))
    max_nnz = support.sum(-1).amax(-1)

    w = values.shape[-1]
    L = mc
    if sparsity == "column":
        plan = SparseTransportPlan(I.reshape(*batch, L, w), values.reshape(*batch, L, w), n, m, "column", C)
        f, g = alpha.reshape(*batch, n), beta.reshape(*batch, m)
    else:
        plan = SparseTransportPlan(I.reshape(*batch, L, w), values.reshape(*batch, L, w), n, m, "row", C)
        f, g = beta.reshape(*batch, n), alpha.reshape(*batch, m)
    with torch.no_grad():
        r1, c1 = plan.marginals()
        viol = (r1 - aw).abs().sum(-1) + (c1 - bw).abs().sum(-1)
    aux = SparseOTAux(plan=plan, value=value.reshape(batch), primal_value=primal.reshape(batch),
                      transport_cost=tcost.reshape(batch), marginal_violation=viol,
                      max_nnz=max_nnz.reshape(batch),
                      k=torch.full(batch, kk, dtype=torch.int64, device=device), gamma=gam.reshape(batch))
    return Result((f, g), res.converged.reshape(batch), res.iterations.reshape(batch),
                  res.residual.reshape(batch), res.status.reshape(batch), aux)


def quadratic_ot(a: torch.Tensor | None, b: torch.Tensor | None, C: torch.Tensor, *,
                 gamma: float | torch.Tensor, formulation: str = "semi_dual",
                 solver: DualLBFGS | DualAdam | str = "lbfgs", tol: float | None = None,
                 adjoint: ImplicitAdjoint | None = None, backend: Backend | str | None = None,
                 callback: Callable[[int, torch.Tensor], None] | None = None,
                 throw: bool = True) -> Result[SparseOTAux]:
    r"""Quadratically regularized OT (Blondel, Seguy & Rolet 2018): :func:`sparse_ot` with ``k=None``.

    .. math:: \min_{P \in U(a, b)} \langle C, P\rangle + \frac{\gamma}{2}\lVert P\rVert_F^2 ,

    the ``k → ∞`` limit of sparsity-constrained OT. Strong duality holds, so ``aux.value``
    equals ``aux.primal_value`` at convergence and the marginals are met to ``tol``. The plan is
    sparse by itself (its support shrinks with ``γ``) and is returned as a
    :class:`SparseTransportPlan`. Same arguments, result and gradients as :func:`sparse_ot`.

    Example:
        >>> import torch
        >>> res = quadratic_ot(None, None, torch.rand(5, 4, dtype=torch.float64), gamma=0.1)
        >>> bool(torch.isclose(res.aux.value, res.aux.primal_value))
        True
        >>> rows, cols = res.aux.plan.marginals()   # P1 = a, Pᵀ1 = b (uniform here)
        >>> torch.allclose(rows, torch.full_like(rows, 1 / 5)), torch.allclose(cols, torch.full_like(cols, 1 / 4))
        (True, True)
    """
    return sparse_ot(a, b, C, k=None, gamma=gamma, sparsity="column", formulation=formulation, solver=solver,
                     tol=tol, adjoint=adjoint, backend=backend, callback=callback, throw=throw)

r"""``linprog`` with SciPy's signature, solved by batched PDHG, differentiable by implicit diff.

:func:`linprog` takes the arguments of :func:`scipy.optimize.linprog`

.. math::

    \min_x c^\top x \quad\text{s.t.}\quad A_{ub} x \le b_{ub},\; A_{eq} x = b_{eq},\;
    l \le x \le u,

so code can switch by changing the import; it never calls SciPy. :func:`diag_qp` adds a
diagonal quadratic term :math:`\tfrac12 x^\top \operatorname{diag}(q) x` (q ≥ 0).

**Gradients** (:class:`LPGradient`). The solution ``z = (x, y)`` is differentiated by the
implicit function theorem through the projected-KKT ("natural residual") optimality condition

.. math::

    F(x, y) = \begin{bmatrix} x - \Pi_{[l,u]}\big(x - (c + q\odot x - K^\top y)\big) \\
                              y - \Pi_{Y}\big(y + (b - K x)\big) \end{bmatrix} = 0,

whose Jacobian is the KKT matrix restricted to the active set (active bounds and constraints).
For an LP this is the *exact* derivative wherever the solution is nondegenerate (strictly
complementary, unique): ``∂x/∂c = 0`` (a vertex does not move under small cost changes),
``∂x/∂b`` and ``∂x/∂A`` are those of the active basis, and the duals and the objective get their
true derivatives (``∂ fun/∂c = x``, ``∂ fun/∂b_eq = eqlin``). At degenerate solutions the
Jacobian is singular and backward raises with a hint. With ``LPGradient(gamma=γ) `` (γ > 0) the
forward pass solves the quadratically regularized LP :math:`c^\top x + \tfrac{γ}{2}\lVert x\rVert^2`
instead — a different problem, whose solution moves smoothly with ``c`` — and its gradient is
exact for that problem. Nothing is approximated silently: the gradient is always that of the
problem actually solved.

The primal iterate is computed in float precision of ``c``; use float64 for the default
tolerances.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..._result import Result, Status, raise_if_failed, register_aux
from ...implicit import ImplicitAdjoint, custom_root
from ._data import LPData, prepare_lp
from .pdhg import PDHG, PDHGState, run_pdhg

__all__ = ["linprog", "diag_qp", "LPGradient", "LinprogInfo", "LinprogResult"]


@dataclasses.dataclass(frozen=True)
class LPGradient:
    """How :func:`linprog` / :func:`diag_qp` solutions are differentiated.

    Args:
        gamma: Quadratic regularization γ ≥ 0. ``0`` (default): the forward pass solves the LP
            itself and gradients are the exact active-set derivatives of a nondegenerate LP
            (zero with respect to ``c`` for ``x``). ``γ > 0``: the forward pass solves
            ``min cᵀx + (γ/2)‖x‖²`` over the same constraints and differentiates that problem.
        adjoint: The implicit-differentiation config (linear solver of the adjoint system;
            the KKT Jacobian is nonsymmetric, so ``Auto`` picks LU or GMRES).

    Example:
        >>> from optlayers.solvers.lp import LPGradient
        >>> smooth = LPGradient(gamma=1e-2)
    """

    gamma: float = 0.0
    adjoint: ImplicitAdjoint = dataclasses.field(default_factory=ImplicitAdjoint)

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if not isinstance(self.adjoint, ImplicitAdjoint):
            raise ValueError(f"adjoint must be an ImplicitAdjoint, got {self.adjoint!r}")


@register_aux
@dataclasses.dataclass(frozen=True)
class LinprogInfo:
    r"""Extras of :func:`linprog` (SciPy's sign conventions for the marginals).

    The marginals are the sensitivities of the optimal value :math:`f^\star = c^\top x^\star`
    (:math:`+\tfrac12 x^\top \operatorname{diag}(q) x` for :func:`diag_qp`) to the right-hand
    sides: :math:`\partial f^\star/\partial b_{eq} = \nu`,
    :math:`\partial f^\star/\partial b_{ub} = -\lambda \le 0`, and for the bounds the positive and
    negative parts of the reduced cost :math:`c + q\odot x - K^\top y`.

    Attributes:
        fun: Objective value ``cᵀx (+ ½ xᵀQx)``, batch shape.
        eqlin: ``∂ fun / ∂ b_eq``, ``(*batch, m_eq)``.
        ineqlin: ``∂ fun / ∂ b_ub`` (≤ 0), ``(*batch, m_ub)``.
        lower: ``∂ fun / ∂ l`` (≥ 0), ``(*batch, n)``.
        upper: ``∂ fun / ∂ u`` (≤ 0), ``(*batch, n)``.
        primal_residual: ``‖r_p‖₂`` (original units), batch shape.
        dual_residual: ``‖r_d‖₂``, batch shape.
        gap: ``|primal − dual objective|``, batch shape.
        polished: Whether feasibility polishing succeeded, batch shape.

    Example:
        ``min −x₁ − 2x₂`` s.t. ``x₁ + x₂ ≤ 1``, ``0 ≤ x ≤ ¾``: raising ``b_ub`` by one lets ``x₁``
        grow (``ineqlin = −1``); raising ``u₂`` trades ``x₁`` for ``x₂`` (``upper₂ = −1``):

        >>> import torch
        >>> from optlayers.solvers.lp import linprog
        >>> c = torch.tensor([-1.0, -2.0], dtype=torch.float64)
        >>> A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> res = linprog(c, A_ub=A, b_ub=torch.tensor([1.0], dtype=torch.float64), bounds=(0, 0.75))
        >>> info = res.aux
        >>> round(float(info.fun), 6), [round(v, 6) for v in info.ineqlin.tolist()]
        (-1.75, [-1.0])
        >>> [round(v, 6) + 0.0 for v in info.upper.tolist()], [round(v, 6) for v in info.lower.tolist()]
        ([0.0, -1.0], [0.0, 0.0])
        >>> info.eqlin.shape, bool(info.primal_residual < 1e-6)
        (torch.Size([0]), True)
    """

    fun: Tensor
    eqlin: Tensor
    ineqlin: Tensor
    lower: Tensor
    upper: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor
    polished: Tensor


@dataclasses.dataclass(frozen=True)
class LinprogResult(Result[LinprogInfo]):
    r"""A :class:`~optlayers.Result` that also answers SciPy's ``.x``, ``.fun``, ``.nit``.

    ``x`` is the solution :math:`x^\star` of the LP (or diagonal QP), ``fun`` the optimal value
    :math:`c^\top x^\star` (:math:`+\tfrac12 x^{\star\top}\operatorname{diag}(q)x^\star`), ``nit``
    the PDHG iterations; the marginals are in ``aux`` (:class:`LinprogInfo`).

    Example:
        >>> import torch
        >>> from optlayers.solvers.lp import linprog
        >>> c = torch.tensor([-1.0, -2.0], dtype=torch.float64)
        >>> A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> res = linprog(c, A_ub=A, b_ub=torch.tensor([1.0], dtype=torch.float64), bounds=(0, 0.75))
        >>> [round(v, 6) for v in res.x.tolist()], round(float(res.fun), 6)
        ([0.25, 0.75], -1.75)
        >>> res.message
        'SUCCESS: the solve met its tolerance.'
        >>> bool(res.nit == res.iterations)
        True
    """

    @property
    def x(self) -> Tensor:
        """The primal solution (``solution``)."""
        return self.solution

    @property
    def fun(self) -> Tensor:
        """The objective value (``aux.fun``)."""
        return self.aux.fun

    @property
    def nit(self) -> Tensor:
        """Iterations used (``iterations``)."""
        return self.iterations

    @property
    def message(self) -> str:
        """A one-line summary of the worst status."""
        worst = Status(int(self.status.max()))
        return f"{worst.name}: {worst.hint}"


torch.utils._pytree.register_pytree_node(
    LinprogResult,
    lambda r: ([r.solution, r.converged, r.iterations, r.residual, r.status, r.aux], None),
    lambda v, ctx: LinprogResult(*v),
    serialized_type_name="optlayers.solvers.lp.LinprogResult",
)


@register_aux
@dataclasses.dataclass(frozen=True)
class _SolveAux:
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor
    polished: Tensor


def _natural_residual(n: int, n_eq: int) -> Callable[..., Tensor]:
    def optimality(z: Tensor, c: Tensor, q: Tensor, K: Any, rhs: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        x, y = z[..., :n], z[..., n:]
        if isinstance(K, Tensor) and K.layout == torch.strided:
            Kx = (K @ x.unsqueeze(-1)).squeeze(-1)
            KTy = (K.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1)
        else:
            raise ValueError("internal: dense K expected")
        gx = c + q * x - KTy
        Fx = x - torch.maximum(torch.minimum(x - gx, hi), lo)
        yn = y + (rhs - Kx)
        m = y.shape[-1]
        eq = torch.arange(m, device=y.device) < n_eq
        Fy = y - torch.where(eq, yn, yn.clamp_min(0))
        return torch.cat([Fx, Fy], dim=-1)

    return optimality


def _natural_residual_sparse(n: int, n_eq: int, op: Any) -> Callable[..., Tensor]:
    def optimality(z: Tensor, c: Tensor, q: Tensor, rhs: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        x, y = z[..., :n], z[..., n:]
        shp = x.shape[:-1]
        Kx = op.mv(x.reshape(-1, n)).reshape(*shp, -1)
        KTy = op.rmv(y.reshape(-1, y.shape[-1])).reshape(*shp, n)
        gx = c + q * x - KTy
        Fx = x - torch.maximum(torch.minimum(x - gx, hi), lo)
        yn = y + (rhs - Kx)
        eq = torch.arange(y.shape[-1], device=y.device) < n_eq
        Fy = y - torch.where(eq, yn, yn.clamp_min(0))
        return torch.cat([Fx, Fy], dim=-1)

    return optimality


def _result_from_state(st: PDHGState, n: int) -> Result:
    z = torch.cat([st.x, st.y], dim=-1)
    aux = _SolveAux(st.primal_residual, st.dual_residual, st.gap, st.polished)
    return Result(z, st.converged, st.iterations, st.residual, st.status, aux)


def _solve(data: LPData, solver: PDHG, gradient: LPGradient, x0: Any, y0: Any,
           callback: Callable[[int, Tensor], None] | None, name: str, throw: bool) -> LinprogResult:
    if not isinstance(solver, PDHG):
        raise ValueError(f"solver must be a PDHG config, got {solver!r}")
    if not isinstance(gradient, LPGradient):
        raise ValueError(f"gradient must be an LPGradient, got {gradient!r}")
    if gradient.gamma > 0:
        data = dataclasses.replace(data, q=data.q + gradient.gamma, has_q=True)
    B, n, m = data.B, data.n, data.m
    x0f = None if x0 is None else torch.as_tensor(x0, dtype=data.c.dtype, device=data.c.device).expand(
        *data.batch_shape, n).reshape(B, n)
    y0f = None if y0 is None else torch.as_tensor(y0, dtype=data.c.dtype, device=data.c.device).expand(
        *data.batch_shape, m).reshape(B, m)

    params = [data.c, data.q, data.rhs, data.lower, data.upper]
    dense = not data.K.sparse
    if dense:
        params.insert(2, data.K.K)
    needs_grad = torch.is_grad_enabled() and any(isinstance(p, Tensor) and p.requires_grad for p in params)

    def run(detached: LPData) -> Result:
        st = run_pdhg(detached, solver, x0f, y0f, callback)
        return _result_from_state(st, n)

    if not needs_grad:
        with torch.no_grad():
            res = run(data)
        z = res.solution
    else:
        if dense:
            Kfull = data.K.K.expand(B, m, n)
            opt = _natural_residual(n, data.n_eq)

            @custom_root(opt, adjoint=gradient.adjoint, batch_ndim=1)
            def solve_dense(z0: Tensor, c: Tensor, q: Tensor, K: Tensor, rhs: Tensor, lo: Tensor,
                            hi: Tensor) -> Result:
                from .preconditioning import LinOp
                d = dataclasses.replace(data, c=c, q=q, K=LinOp(K), rhs=rhs, lower=lo, upper=hi)
                return run(d)

            z0 = data.c.new_zeros(B, n + m)
            res = solve_dense(z0, data.c, data.q, Kfull, data.rhs, data.lower, data.upper)
        else:
            opt = _natural_residual_sparse(n, data.n_eq, data.K)

            @custom_root(opt, adjoint=gradient.adjoint, batch_ndim=1)
            def solve_sparse(z0: Tensor, c: Tensor, q: Tensor, rhs: Tensor, lo: Tensor, hi: Tensor) -> Result:
                d = dataclasses.replace(data, c=c, q=q, rhs=rhs, lower=lo, upper=hi)
                return run(d)

            z0 = data.c.new_zeros(B, n + m)
            res = solve_sparse(z0, data.c, data.q, data.rhs, data.lower, data.upper)
        z = res.solution
    x, y = z[..., :n], z[..., n:]
    # marginals and objective from the (differentiable) solution
    Kx = data.K.mv(x) if not dense else _mv(data.K.K, x)
    KTy = data.K.rmv(y) if not dense else _rmv(data.K.K, y)
    lam = data.c + data.q * x - KTy
    lfin, ufin = torch.isfinite(data.lower), torch.isfinite(data.upper)
    lower_m = torch.where(lfin, lam.clamp_min(0), torch.zeros_like(lam))
    upper_m = -torch.where(ufin, (-lam).clamp_min(0), torch.zeros_like(lam))
    fun = (data.c * x).sum(-1) + 0.5 * (data.q * x * x).sum(-1)
    del Kx
    bs = data.batch_shape

    def shape(t: Tensor) -> Tensor:
        return t.reshape(tuple(bs) + tuple(t.shape[1:]))

    aux0: _SolveAux = res.aux
    info = LinprogInfo(fun=shape(fun), eqlin=shape(y[:, : data.n_eq]), ineqlin=shape(-y[:, data.n_eq:]),
                       lower=shape(lower_m), upper=shape(upper_m), primal_residual=shape(aux0.primal_residual),
                       dual_residual=shape(aux0.dual_residual), gap=shape(aux0.gap), polished=shape(aux0.polished))
    out = LinprogResult(shape(x), shape(res.converged), shape(res.iterations), shape(res.residual),
                        shape(res.status), info)
    return raise_if_failed(name, out, throw, tol=solver.rtol, max_iter=solver.max_iter)  # type: ignore[return-value]


def _mv(K: Tensor, x: Tensor) -> Tensor:
    return (K @ x.unsqueeze(-1)).squeeze(-1)


def _rmv(K: Tensor, y: Tensor) -> Tensor:
    return (K.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1)


def linprog(c: Any, A_ub: Any = None, b_ub: Any = None, A_eq: Any = None, b_eq: Any = None,
            bounds: Any = (0, None), *, x0: Any = None, y0: Any = None, solver: PDHG | None = None,
            gradient: LPGradient | None = None, callback: Callable[[int, Tensor], None] | None = None,
            throw: bool = True) -> LinprogResult:
    r"""Solve a (batch of) linear program(s) in :func:`scipy.optimize.linprog`'s conventions.

    .. math::

        \min_x c^\top x \quad\text{s.t.}\quad A_{ub} x \le b_{ub},\; A_{eq} x = b_{eq},\;
        l \le x \le u.

    Solved by :class:`PDHG` (PDLP); never calls SciPy. Leading dimensions of every argument
    are batch dimensions (broadcast together); a sparse ``A_ub``/``A_eq`` (torch sparse or
    ``scipy.sparse``) is shared by the batch. Differentiable in ``c``, ``A`` (dense), ``b`` and
    tensor bounds (see the module docstring for which gradient is used, and :class:`LPGradient`).

    Args:
        c: ``(*batch, n)`` cost.
        A_ub, b_ub: ``(*batch, m_ub, n)`` and ``(*batch, m_ub)``: ``A_ub x ≤ b_ub``.
        A_eq, b_eq: ``(*batch, m_eq, n)`` and ``(*batch, m_eq)``: ``A_eq x = b_eq``.
        bounds: SciPy's forms: one ``(min, max)`` pair for all variables (default ``(0, None)``),
            ``n`` pairs, ``None`` for free variables, or a pair of tensors ``(l, u)``.
        x0, y0: Warm start: primal ``(*batch, n)`` and dual ``(*batch, m_eq + m_ub)`` in the
            internal sign convention (``y = [eqlin, −ineqlin]``).
        solver: A :class:`PDHG` config (default ``PDHG()``: ``rtol=1e-8``) or its
            prediction–correction variant :class:`~optlayers.solvers.lp.AdaptivePDHG`.
        gradient: An :class:`LPGradient` (default: exact LP gradient, ``gamma=0``).
        callback: Called at every check with ``(iteration, residual)``.
        throw: Raise :class:`~optlayers.ConvergenceError` when an element fails (including
            infeasible and unbounded problems); with False read ``status``.

    Returns:
        A :class:`LinprogResult`: ``solution``/``.x`` is ``x``; ``aux`` holds ``fun`` and the
        marginals ``eqlin``, ``ineqlin``, ``lower``, ``upper``; ``status`` is
        ``SUCCESS``, ``MAX_ITER``, ``INFEASIBLE``, ``UNBOUNDED`` (primal unbounded, or dual
        infeasible) or ``NONFINITE``.

    Raises:
        ConvergenceError: When ``throw`` and an element did not solve.
        ValueError: On inconsistent shapes or invalid configs.

    Example:
        >>> import torch
        >>> from optlayers.solvers.lp import linprog
        >>> c = torch.tensor([-1.0, -2.0], dtype=torch.float64)
        >>> A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> res = linprog(c, A_ub=A, b_ub=torch.tensor([1.0], dtype=torch.float64))
        >>> round(float(res.fun), 6)
        -2.0
    """
    data = prepare_lp(c, A_ub, b_ub, A_eq, b_eq, bounds)
    solver = solver or PDHG()
    return _solve(data, solver, gradient or LPGradient(), x0, y0, callback, f"linprog({type(solver).__name__})", throw)


def diag_qp(q: Any, c: Any, A_ub: Any = None, b_ub: Any = None, A_eq: Any = None, b_eq: Any = None,
            bounds: Any = (0, None), *, x0: Any = None, y0: Any = None, solver: PDHG | None = None,
            gradient: LPGradient | None = None, callback: Callable[[int, Tensor], None] | None = None,
            throw: bool = True) -> LinprogResult:
    r"""Solve a convex QP with a diagonal quadratic term by PDHG, in ``linprog``'s conventions.

    .. math::

        \min_x \tfrac12 x^\top \operatorname{diag}(q) x + c^\top x \quad\text{s.t.}\quad
        A_{ub} x \le b_{ub},\; A_{eq} x = b_{eq},\; l \le x \le u, \qquad q \ge 0.

    Same arguments, result and gradient as :func:`linprog` plus ``q`` ``(*batch, n)``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.lp import diag_qp
        >>> one = torch.ones(2, dtype=torch.float64)
        >>> res = diag_qp(one, -one, bounds=(None, None))
        >>> res.x
        tensor([1., 1.], dtype=torch.float64)
    """
    data = prepare_lp(c, A_ub, b_ub, A_eq, b_eq, bounds, q=q)
    if bool((data.q < 0).any()):
        raise ValueError("q must be >= 0 (a convex diagonal quadratic term)")
    solver = solver or PDHG()
    return _solve(data, solver, gradient or LPGradient(), x0, y0, callback, f"diag_qp({type(solver).__name__})", throw)

r"""Differentiable QP layer (OptNet-style): :func:`qp` and :class:`QPLayer`.

.. math::

    z^\star(\theta) = \operatorname*{argmin}_x \tfrac12 x^\top Q x + p^\top x
    \quad\text{s.t.}\quad Ax = b,\; Gx \le h, \qquad \theta = (Q, p, A, b, G, h).

The forward pass is the batched interior-point method of
:class:`~optlayers.solvers.InteriorPoint` (one batched factorization per iteration, no Python
loop over the batch). Gradients with respect to every input come from the implicit function
theorem applied to the KKT conditions (:func:`~optlayers.solvers.qp.qp_optimality`, OptNet's
differential form), through :func:`optlayers.implicit.custom_root`; the adjoint system is solved
with the factorization of the final KKT matrix (:class:`~optlayers.solvers.qp.KKTSolve`). The
solution ``z = (x, ν, λ)`` is one root, so the duals are differentiable too, and reverse mode,
forward mode, double backward and ``torch.func.vmap``/``jacrev``/``jacfwd`` all work.

A plain reverse-mode call (no ``torch.func`` transform, no forward-mode level active) takes a
shorter route to the same gradient: one KKT solve with that factorization and OptNet's
closed-form parameter gradients (:mod:`optlayers.solvers.qp.explicit_vjp`), instead of tracing
the KKT conditions under autograd; a backward with ``create_graph=True`` replays the generic
route on the same solution.

References:
    Amos & Kolter, "OptNet: Differentiable Optimization as a Layer in Neural Networks",
    ICML 2017 (arXiv:1703.00443).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._result import Result, raise_if_failed
from ...implicit import ImplicitAdjoint, custom_root
from ...solvers.qp._data import QPData, prepare_qp
from ...solvers.qp.adjoint import KKTCache, KKTSolve, qp_optimality
from ...solvers.qp.explicit_vjp import ExplicitGradState, QPExplicitGrad, explicit_grad_applies
from ...solvers.qp.interior_point import InteriorPoint, QPAux, warm_start_tensors

__all__ = ["qp", "QPLayer"]


def qp(Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
       A: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
       solver: InteriorPoint | None = None, init: Result | torch.Tensor | None = None,
       throw: bool = True) -> Result[QPAux]:
    r"""Solve ``min ½xᵀQx + pᵀx s.t. Ax = b, Gx ≤ h`` for a batch, differentiably.

    Any of ``Q, p, G, h, A, b`` may be shared (no batch dimension) or batched (leading
    dimensions, broadcast together). ``Q`` must be symmetric positive semidefinite; the
    gradient needs a unique solution with strict complementarity (e.g. ``Q ≻ 0``, or the
    constraints pinning the solution down as in an LP vertex).

    Gradients (implicit function theorem on the KKT conditions
    :math:`Qx + p + A^\top\nu + G^\top\lambda = 0,\ Ax = b,\ \lambda \odot (Gx - h) = 0`) flow
    to every floating-point input that requires them, from the solution and from the duals.

    Args:
        Q: ``(*bQ, n, n)``.
        p: ``(*bp, n)``.
        G, h: ``(*bG, m, n)``, ``(*bh, m)`` or None (no inequalities).
        A, b: ``(*bA, k, n)``, ``(*bb, k)`` or None (no equalities).
        solver: :class:`~optlayers.solvers.InteriorPoint` configuration (defaults: rtol 1e-12 in
            float64, 1e-6 in float32).
        init: Warm start: a previous :class:`Result` (primal and duals) or a primal guess.
        throw: Raise :class:`~optlayers.ConvergenceError` when an element fails; the message
            names the status (``INFEASIBLE``, ``UNBOUNDED``, ``MAX_ITER``, ...) and the failing
            batch indices. With ``throw=False`` read ``result.status``: failed elements hold NaN
            (never a silent zero) and contribute zero gradient once masked out.

    Returns:
        :class:`Result` with ``solution`` ``x`` of shape ``(*batch, n)`` and :class:`QPAux`
        ``(ineq_dual λ, eq_dual ν, slack h − Gx)``, all differentiable.

    Raises:
        ConvergenceError: With ``throw=True``, when any element does not solve.
        ValueError, TypeError: On inconsistent shapes, dtypes or devices.

    Example:
        >>> import torch
        >>> from optlayers.layers import qp
        >>> Q = torch.eye(2, dtype=torch.float64)
        >>> p = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> G, h = torch.eye(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
        >>> res = qp(Q, p, G, h)
        >>> res.solution.sum().backward()   # d x*/d p = 0: both constraints are active
    """
    cfg = solver if solver is not None else InteriorPoint()
    if not isinstance(cfg, InteriorPoint):
        raise TypeError(f"solver must be an InteriorPoint config, got {type(cfg).__name__}")
    data = prepare_qp(Q, p, G, h, A, b)  # validates shapes/dtypes before anything runs
    n = data.n
    if G is None:
        G, h = Q.new_zeros(0, n), Q.new_zeros(0)
    if A is None:
        A, b = Q.new_zeros(0, n), Q.new_zeros(0)
    assert G is not None and h is not None and A is not None and b is not None
    x0, nu0, lam0 = warm_start_tensors(init)
    if explicit_grad_applies():
        return _qp_explicit(cfg, data, (Q, p, G, h, A, b), (x0, nu0, lam0), throw)
    return _qp_generic(cfg, data, (Q, p, G, h, A, b), (x0, nu0, lam0), throw)


def _solve_flat(cfg: InteriorPoint, d: QPData, warm: tuple, throw: bool, cache: KKTCache,
                factor: bool = True, done: tuple | None = None) -> tuple[Result, tuple]:
    """Run the interior point on prepared data (or take ``done``, an earlier run), check, fill ``cache``.

    Returns the raw batch-shaped :class:`Result` and the ``factor_out`` record of
    :meth:`InteriorPoint._run`, so that a replay can reuse both.
    """
    if done is None:
        start = tuple(warm) if warm[0] is not None else None
        kept: list = []
        with torch.no_grad():
            raw = cfg._run(d, start, factor_out=kept if factor else None)
        # Checked here, on real tensors, so that throw=True also works under torch.func.vmap.
        raise_if_failed("qp (InteriorPoint)", raw, throw, tol=cfg.tolerance(d.Q.dtype), max_iter=cfg.max_iter)
        done = (raw, kept[0] if kept else None)
    raw, record = done
    if record is not None:
        B, m = d.B, d.n_ineq
        valid = torch.isfinite(raw.solution).reshape(B, -1).all(-1)
        H0, C, delta, sc, parts = record
        aux = raw.aux
        cache.add(d.Q, d.A, d.G, aux.slack.reshape(B, m), aux.ineq_dual.reshape(B, m), delta, valid,
                  H0=H0, C=C, schur=sc, factor_parts=parts)
    return raw, done


def _qp_result(res: Result, x: torch.Tensor, nu: torch.Tensor, lam: torch.Tensor, G: torch.Tensor,
               h: torch.Tensor) -> Result[QPAux]:
    slack = h - (x.unsqueeze(-2) @ G.mT).squeeze(-2)  # row-vector form: batched BLAS runs it faster than G x
    return Result(solution=x, converged=res.converged, iterations=res.iterations, residual=res.residual,
                  status=res.status, aux=QPAux(ineq_dual=lam, eq_dual=nu, slack=slack))


def _qp_explicit(cfg: InteriorPoint, data: QPData, inputs: tuple[torch.Tensor, ...], warm: tuple,
                 throw: bool) -> Result[QPAux]:
    """A plain call: one solve, and the closed-form reverse-mode gradient of :mod:`.explicit_vjp`."""
    Q, p, G, h, A, b = inputs
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    cache = KKTCache()
    raw, done = _solve_flat(cfg, data, warm, throw, cache, factor=grad)
    x, nu, lam = raw.solution, raw.aux.eq_dual, raw.aux.ineq_dual
    if grad:
        def replay(*ins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            res = _qp_generic(cfg, data, ins, warm, throw, done=done)
            return res.solution, res.aux.eq_dual, res.aux.ineq_dual

        state = ExplicitGradState(solution=(x, nu, lam), batch_shape=data.batch_shape,
                                  solver=KKTSolve(cache=cache), throw=True, replay=replay,
                                  C=done[1][1] if done[1] is not None else None)
        x, nu, lam = QPExplicitGrad.apply(state, Q, p, G, h, A, b)
    return _qp_result(raw, x, nu, lam, G, h)


def _qp_generic(cfg: InteriorPoint, data: QPData, inputs: tuple[torch.Tensor, ...], warm: tuple,
                throw: bool, done: tuple | None = None) -> Result[QPAux]:
    """Through :func:`~optlayers.implicit.custom_root`: forward mode, double backward, ``torch.func``."""
    Q, p, G, h, A, b = inputs
    n, k, m = data.n, data.n_eq, data.n_ineq
    batch = tuple(data.batch_shape)
    cache = KKTCache()
    adjoint = ImplicitAdjoint(linear_solver=KKTSolve(cache=cache))

    @custom_root(qp_optimality, adjoint=adjoint, batch_ndim=len(batch))
    def _solve(z0: Any, Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor, h: torch.Tensor,
               A: torch.Tensor, b: torch.Tensor, *warm: torch.Tensor | None) -> Result:
        raw, _ = _solve_flat(cfg, prepare_qp(Q, p, G, h, A, b), warm, throw, cache, done=done)
        aux = raw.aux
        return Result(solution=(raw.solution, aux.eq_dual, aux.ineq_dual), converged=raw.converged,
                      iterations=raw.iterations, residual=raw.residual, status=raw.status, aux=())

    z0 = (Q.new_zeros(*batch, n), Q.new_zeros(*batch, k), Q.new_zeros(*batch, m))
    res = _solve(z0, Q, p, G, h, A, b, *warm)
    x, nu, lam = res.solution
    return _qp_result(res, x, nu, lam, G, h)


class QPLayer(nn.Module):
    r"""A QP as a network layer: ``forward(Q, p, G, h, A, b) -> x*`` (see :func:`qp`).

    .. math::

        x^\star = \operatorname*{argmin}_x \tfrac12 x^\top Q x + p^\top x
        \quad\text{s.t.}\quad Ax = b,\; Gx \le h,

    batched over leading dimensions, differentiable in every input through the KKT conditions
    :math:`Qx + p + A^\top\nu + G^\top\lambda = 0,\ Ax = b,\ \lambda \odot (Gx - h) = 0`.

    Args:
        solver: :class:`~optlayers.solvers.InteriorPoint` configuration.
        throw: Raise on failed elements (see :func:`qp`).

    Example:
        >>> import torch
        >>> from optlayers.layers import QPLayer
        >>> layer = QPLayer()
        >>> Q = torch.eye(3, dtype=torch.float64); p = torch.randn(4, 3, dtype=torch.float64)
        >>> x = layer(Q, p, -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        >>> x.shape
        torch.Size([4, 3])
        >>> torch.allclose(x, (-p).clamp_min(0), atol=1e-8)  # projection of −p onto x ≥ 0
        True
    """

    def __init__(self, *, solver: InteriorPoint | None = None, throw: bool = True) -> None:
        super().__init__()
        self.solver = solver if solver is not None else InteriorPoint()
        self.throw = throw

    def forward(self, Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None,
                h: torch.Tensor | None = None, A: torch.Tensor | None = None,
                b: torch.Tensor | None = None) -> torch.Tensor:
        return self.solve(Q, p, G, h, A, b).solution

    def solve(self, Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None,
              h: torch.Tensor | None = None, A: torch.Tensor | None = None,
              b: torch.Tensor | None = None, *, init: Result | torch.Tensor | None = None) -> Result[QPAux]:
        """The full :class:`Result` (solution, duals, slack, per-element status)."""
        return qp(Q, p, G, h, A, b, solver=self.solver, init=init, throw=self.throw)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, throw={self.throw}"

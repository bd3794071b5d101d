r"""The QP's reverse-mode gradient in closed form around one KKT solve (the fast path of :func:`~optlayers.layers.qp`).

With the optimality condition :func:`.adjoint.qp_optimality`

.. math::

    F(z, \theta) = \big(Qx + p + A^\top\nu + G^\top\lambda,\ \ Ax - b,\ \
    c \odot (Gx - h)\big), \qquad c = \lambda / \hat\lambda,\ \ \hat\lambda = \operatorname{sg}(\lambda),

the implicit function theorem gives, for a cotangent :math:`\bar z = (\bar x, \bar\nu, \bar\lambda)`
of the solution and the adjoint :math:`u = (u_x, u_\nu, u_\lambda)` solving
:math:`(\partial_z F)^\top u = \bar z`,

.. math::

    \bar Q = -u_x x^\top,\quad \bar p = -u_x,\quad \bar A = -(\nu u_x^\top + u_\nu x^\top),\quad
    \bar b = u_\nu,\quad \bar G = -(\lambda u_x^\top + (c \odot u_\lambda) x^\top),\quad
    \bar h = c \odot u_\lambda,

which are :math:`-(\partial_\theta F)^\top u` written out (OptNet's formulas, Amos & Kolter 2017,
eq. 8, in this scaling). The adjoint's operator is applied explicitly,

.. math::

    (\partial_z F)^\top u = \big(Q^\top u_x + A^\top u_\nu + G^\top (c \odot u_\lambda),\ \
    A u_x,\ \ G u_x + r \odot u_\lambda\big), \qquad r = (Gx - h)/\hat\lambda = -s/\lambda,

and the solve is :class:`.adjoint.KKTSolve` with the factorization the forward solve left in
its :class:`.adjoint.KKTCache` (refined against this exact operator, residual checked, scaled-LU
fallback). This is the same gradient as the generic route through
:func:`optlayers.implicit.custom_root` (the tests compare the two), without tracing
:func:`.adjoint.qp_optimality` twice under autograd for the operator and the parameter VJP: at the
benchmark size of ``benchmarks/bench_qp.py`` (batch 128, n = 50, 60 constraints) the backward
went from ~13 ms to ~2 ms.

:class:`QPExplicitGrad` is used for a plain reverse-mode call only. A backward with
``create_graph=True`` (double backward) replays the generic route on the same solution and
differentiates that, and forward mode and ``torch.func`` transforms take the generic route from
the start (:func:`~optlayers.layers.qp` decides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..._result import AdjointSolveError, Result, failure_message
from ...implicit.linear_solvers import LinearOperator
from ._data import prepare_qp
from .adjoint import KKTSolve
from .kkt import KKTFactor, stack_constraints

__all__ = ["QPExplicitGrad", "ExplicitGradState", "explicit_grad_applies"]


def explicit_grad_applies() -> bool:
    """Whether the closed-form reverse-mode path may run: no ``torch.func`` transform and no
    forward-mode level is active (both need the generic :class:`~optlayers.implicit.custom_root`
    primitive, which has ``jvp`` and ``vmap`` rules)."""
    from torch.autograd import forward_ad

    return not torch._C._are_functorch_transforms_active() and getattr(forward_ad, "_current_level", -1) < 0


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _rowmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M v`` for ``M (B|1, r, c)``, ``v (B, c)`` as a row-vector product (faster batched BLAS)."""
    return (v.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)


def _rowmtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Mᵀ v`` for ``M (B|1, r, c)``, ``v (B, r)``."""
    return (v.unsqueeze(-2) @ M).squeeze(-2)


@dataclasses.dataclass
class ExplicitGradState:
    """What the backward of one :func:`~optlayers.layers.qp` call needs besides the saved tensors.

    Attributes:
        solution: ``(x, ν, λ)`` of the forward solve, batch-shaped (returned by the forward).
        batch_shape: The broadcast batch shape of the data.
        solver: The adjoint's :class:`.adjoint.KKTSolve` (holding the forward's :class:`KKTCache`).
        throw: Raise :class:`~optlayers.AdjointSolveError` when the adjoint solve fails.
        replay: ``replay(Q, p, G, h, A, b) -> (x, ν, λ)``: the generic, twice-differentiable route
            on the same solution, used by a backward with ``create_graph=True``.
        C: The stacked constraints ``[A; G]`` of the forward solve (``(B|1, k+m, n)``), or None.
    """

    solution: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    batch_shape: torch.Size
    solver: KKTSolve
    throw: bool
    replay: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    C: torch.Tensor | None = None


class QPExplicitGrad(torch.autograd.Function):
    """``(x, ν, λ) = state.solution`` as a function of ``(Q, p, G, h, A, b)``, with the closed-form VJP."""

    @staticmethod
    def forward(ctx: Any, state: ExplicitGradState, Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor,
                h: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.state = state
        ctx.set_materialize_grads(False)
        x, nu, lam = state.solution
        ctx.save_for_backward(Q, p, G, h, A, b, x, nu, lam)
        return x.clone(), nu.clone(), lam.clone()

    @staticmethod
    def backward(ctx: Any, gx: torch.Tensor | None, gnu: torch.Tensor | None,
                 glam: torch.Tensor | None) -> tuple[Any, ...]:
        state: ExplicitGradState = ctx.state
        Q, p, G, h, A, b, x, nu, lam = ctx.saved_tensors
        data = (Q, p, G, h, A, b)
        needs = ctx.needs_input_grad[1:]
        if gx is None and gnu is None and glam is None:
            return (None,) * 7
        if torch.is_grad_enabled():  # create_graph=True: differentiate the generic route instead
            return (None, *_replayed_grads(state, data, needs, (gx, gnu, glam)))
        return (None, *_closed_form_grads(state, data, needs, (x, nu, lam), (gx, gnu, glam)))


def _compiled_adjoint(state: ExplicitGradState, Q: torch.Tensor, c: torch.Tensor, r: torch.Tensor,
                      rhs: torch.Tensor, k: int) -> Result | None:
    """The adjoint solve as one compiled pass per element (:func:`.kernels.qp_kkt_numba.kkt_refine_numba`).

    Applies where the factorization came from the compiled interior point (one forward solve,
    CPU data). Returns None when it does not apply or when some element misses the tolerance; the
    caller then runs :class:`.adjoint.KKTSolve`, whose scaled-LU fallback handles those elements.
    """
    entries = state.solver.cache.entries
    if len(entries) != 1 or not entries[0].compiled or rhs.device.type != "cpu":
        return None
    from ...kernels.qp_kkt_numba import kkt_refine_numba

    e = entries[0]
    f = e.cholesky()
    assert isinstance(f, KKTFactor)
    rtol = state.solver.rtol if state.solver.rtol is not None else (1e-10 if rhs.dtype == torch.float64 else 1e-4)
    g = torch.where(e.valid.unsqueeze(-1), rhs, torch.zeros_like(rhs))  # failed elements: zero gradient
    u, ok, rel = kkt_refine_numba(f.L, f.C, f.d, Q, c, r, g, k, rtol, state.solver.refine)
    if not bool(ok.all()):
        return None
    zeros = torch.zeros(u.shape[0], dtype=torch.int64)
    return Result(solution=u, converged=ok, iterations=zeros + 1, residual=rel, status=zeros)


def _replayed_grads(state: ExplicitGradState, data: tuple[torch.Tensor, ...], needs: tuple[bool, ...],
                    cot: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """The gradients through the generic primitive (twice differentiable), on the same solution."""
    outs = state.replay(*data)
    pairs = [(o, g) for o, g in zip(outs, cot) if g is not None]
    want = [t for t, nd in zip(data, needs) if nd]
    got = iter(torch.autograd.grad([o for o, _ in pairs], want, [g for _, g in pairs], create_graph=True,
                                   allow_unused=True))
    return [next(got) if nd else None for nd in needs]


def _closed_form_grads(state: ExplicitGradState, data: tuple[torch.Tensor, ...], needs: tuple[bool, ...],
                       z: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       cot: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """``-(∂_θ F)ᵀ u`` with ``(∂_z F)ᵀ u = z̄`` (module docstring), reduced to the input shapes."""
    d = prepare_qp(*data)
    n, k, m, Bn, bs = d.n, d.n_eq, d.n_ineq, d.B, d.batch_shape
    dt, dev = d.Q.dtype, d.Q.device
    x, nu, lam = (_finite(t.reshape(Bn, t.shape[-1])) for t in z)
    lam_c = torch.where(lam > 0, lam, torch.ones_like(lam)).clamp_min(torch.finfo(dt).tiny)
    c = lam / lam_c
    C = state.C if state.C is not None else stack_constraints(d.A, d.G)  # [A; G], (B|1, k+m, n)
    r = (_rowmv(d.G, x) - d.h) / lam_c
    Q = d.Q

    def rmatvec(w: torch.Tensor) -> torch.Tensor:  # (∂_z F)ᵀ w: Qᵀwx + Cᵀ[wν; c∘wλ], C wx + [0; r∘wλ]
        wx, wn, wl = w.split((n, k, m), -1)
        top = _rowmtv(Q, wx) + _rowmtv(C, torch.cat([wn, c * wl], -1))
        bottom = _rowmv(C, wx)
        return torch.cat([top, bottom[:, :k], bottom[:, k:] + r * wl], -1)

    def matvec(w: torch.Tensor) -> torch.Tensor:  # ∂_z F w: Q wx + Cᵀ[wν; wλ], C wx ∘ [1; c] + [0; r∘wλ]
        wx, wn, wl = w.split((n, k, m), -1)
        bottom = _rowmv(C, wx)
        return torch.cat([_rowmv(Q, wx) + _rowmtv(C, w[:, n:]), bottom[:, :k], c * bottom[:, k:] + r * wl], -1)

    parts = [torch.zeros(Bn, size, dtype=dt, device=dev) if g is None else g.reshape(Bn, size)
             for g, size in zip(cot, (n, k, m))]
    rhs = torch.cat(parts, -1)
    op = LinearOperator(matvec=rmatvec, rmatvec=matvec, batch=Bn, n=n + k + m, dtype=dt, device=dev,
                        symmetric=True)
    res = _compiled_adjoint(state, d.Q, c, r, rhs, k)
    if res is None:  # not the compiled kernel's factorization, or an element it could not solve
        res = state.solver(op, rhs)
    if state.throw and not bool(res.converged.all()):
        raise AdjointSolveError(
            failure_message("adjoint solve of qp (KKTSolve)", res, tol=state.solver.rtol)
            + " The implicit gradient needs this solve; the KKT matrix at the solution is singular "
            "(a non-unique solution, or a degenerate vertex without strict complementarity): check that "
            "the forward solve converged, or make Q positive definite.", res)
    ux, un, ul = res.solution.split((n, k, m), -1)
    cul = c * ul
    out: list[torch.Tensor | None] = [None] * 6
    Y = torch.stack([-ux, -x], -2)  # (B, 2, n): every matrix gradient is a rank-two product with it

    def back(i: int, t: torch.Tensor) -> None:
        like = data[i]
        t = t.reshape(bs + t.shape[1:])
        out[i] = t if t.shape == like.shape else t.sum_to_size(like.shape)

    if needs[0]:
        back(0, Y[:, 0].unsqueeze(-1) * x.unsqueeze(-2))  # Q̄ = −u_x xᵀ
    if needs[1]:
        back(1, -ux)
    if needs[2] or needs[4]:  # [Ā; Ḡ] = −[ν; λ] u_xᵀ − [u_ν; c∘u_λ] xᵀ in one product
        if needs[2] and needs[4]:
            left, right = torch.cat([nu, lam], -1), torch.cat([un, cul], -1)
        elif needs[4]:
            left, right = nu, un
        else:
            left, right = lam, cul
        gC = torch.stack([left, right], -1) @ Y
        if needs[2] and needs[4]:
            back(4, gC[:, :k])
            back(2, gC[:, k:])
        else:
            back(4 if needs[4] else 2, gC)
    if needs[3]:
        back(3, cul)
    if needs[5]:
        back(5, un)
    return out

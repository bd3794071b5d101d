"""Structured batched Levenberg–Marquardt for collocation least squares (used by :mod:`.collocation`).

The rows of a hard-constraint problem are ``s_i 𝓕(B_i w)`` with ``B_i ∈ ℝ^{4×N}`` (the basis and
its derivatives at the row) and a pointwise operator ``𝓕`` of the four fields, plus linear
initial-condition rows, a ridge, and optional linear coupling rows between ``K`` problems. The
Jacobian ``J_i = s_i Σ_q ∂_q𝓕 B_{i,q}`` and the second-order term ``Σ_i s_i² 𝓕_i B_iᵀ ∇²𝓕_i B_i``
are assembled from the pointwise partials of ``𝓕`` (closed forms from
:meth:`PDE1D.interior_partials` when available, else one or five reverse passes), instead of
``N`` Jacobian-vector products through the whole residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..._result import Result
from ...implicit import LevenbergMarquardt
from ...implicit.solvers._base import Tracker, masked
from ...implicit.solvers._steps import solve_or_pinv
from .residuals import PDE1D, Fields

if TYPE_CHECKING:
    from .collocation import ConstraintRows

__all__: list[str] = []


def _fields(b: Tensor, w: Tensor) -> Tensor:
    """``(…, P, 4, N) × (…, N) -> (…, P, 4)``."""
    return torch.einsum("...pqn,...n->...pq", b, w)


def _as_fields(f: Tensor) -> Fields:
    return Fields(f[..., 0], f[..., 1], f[..., 2], f[..., 3])


class _Scales:
    """Row weights ``s`` (masked, ``√(λ / count)``) of the four row groups."""

    def __init__(self, rows: ConstraintRows, ic_weight: float, bc_weight: float) -> None:
        dt = rows.pde.dtype

        def scale(mask: Tensor, weight: float, count: Tensor) -> Tensor:
            return mask.to(dt) * torch.sqrt(weight / count.clamp_min(1))

        def count(mask: Tensor) -> Tensor:
            return mask.to(dt).sum(-1, keepdim=True)

        n_bc = count(rows.left_mask) + count(rows.right_mask)
        self.pde = scale(rows.pde_mask, 1.0, count(rows.pde_mask))
        self.ic = scale(rows.ic_mask, ic_weight, count(rows.ic_mask))
        self.left = scale(rows.left_mask, bc_weight, n_bc)
        self.right = scale(rows.right_mask, bc_weight, n_bc)


def _partials(F: Callable[[Fields], Tensor], f: Tensor, second: bool
              ) -> tuple[Tensor, Tensor, list[tuple[int, int, Tensor]], bool]:
    """``𝓕(f)``, its partials ``∂𝓕/∂f_q`` ``(…, P, 4)``, with ``second`` the nonzero second partials
    ``[(a, b, ∂²𝓕/∂f_a∂f_b (…, P))]``, and whether ``𝓕`` is affine (``f (…, P, 4)``; ``𝓕`` acts row by
    row, so one reverse pass gives all first partials and at most four more all second ones)."""
    with torch.enable_grad():
        ff = f.detach().requires_grad_(True)
        r = F(_as_fields(ff))
        (dF,) = torch.autograd.grad(r.sum(), ff, create_graph=True)
        affine = not dF.requires_grad
        pairs: list[tuple[int, int, Tensor]] = []
        if second and not affine:
            for a in range(4):
                (h,) = torch.autograd.grad(dF[..., a].sum(), ff, retain_graph=True, allow_unused=True)
                if h is None:
                    continue
                for b in range(4):
                    hab = h[..., b].detach()
                    if bool((hab != 0).any()):
                        pairs.append((a, b, hab))
    return r.detach(), dF.detach(), pairs, affine


class _Group:
    """Rows ``s_i 𝓕(B_i w)`` of one kind (PDE, left or right boundary), batch-flat ``(B, K, P, …)``."""

    def __init__(self, b: Tensor, s: Tensor, F: Callable[[Fields], Tensor],
                 closed: Callable[[Fields], Any] | None = None) -> None:
        self.b, self.s, self.F, self.closed = b, s, F, closed
        self.affine_dF: Tensor | None = None  # ∂𝓕/∂f once 𝓕 is known to be affine

    def partials(self, f: Tensor, second: bool) -> tuple[Tensor, Tensor, list[tuple[int, int, Tensor]]]:
        if self.affine_dF is not None:
            return self.F(_as_fields(f)), self.affine_dF, []
        out = self.closed(_as_fields(f)) if self.closed is not None else None
        if out is not None:
            return out[0], out[1], (out[2] if second else [])
        r, dF, pairs, affine = _partials(self.F, f, second)
        if affine:
            self.affine_dF = dF
        return r, dF, pairs

    def subset(self, idx: Tensor) -> _Group:
        g = _Group(self.b[idx], self.s[idx], self.F, self.closed)
        g.affine_dF = None if self.affine_dF is None else self.affine_dF[idx]
        return g


class _Structured:
    """Cost ``½‖r‖²``, normal matrix ``JᵀJ`` (or the Hessian) and gradient ``Jᵀr`` from the row structure.

    Problems are stored batch-flat: ``B`` joint problems of ``K`` members (``K = 1`` without coupling
    rows), each with ``N`` unknowns, so a flat iterate is ``z (B, n = K·N)``. No autograd graph is built.
    """

    def __init__(self, pde: PDE1D, rows: ConstraintRows | None, ridge: float, ic_weight: float, bc_weight: float,
                 coupling: Tensor | None) -> None:
        self.pde, self.ridge = pde, ridge
        if rows is None:  # filled by subset()
            return
        batch, N = rows.batch_shape, rows.pde.shape[-1]
        K = batch[-1] if coupling is not None else 1
        B = math.prod(batch) // K
        sc = _Scales(rows, ic_weight, bc_weight)

        def flat(t: Tensor, tail: int) -> Tensor:  # (*batch, *tail) -> (B, K, *tail)
            t = t.detach().expand(*batch, *t.shape[t.dim() - tail:]) if tail else t.detach().expand(batch)
            return t.reshape(B, K, *t.shape[len(batch):])

        b_pde, b_ic, target, b_left, b_right = rows.tensors
        self.groups = [_Group(flat(b_pde, 3), flat(sc.pde, 1), pde.interior, pde.interior_partials),
                       _Group(flat(b_left, 3), flat(sc.left, 1), pde.left),
                       _Group(flat(b_right, 3), flat(sc.right, 1), pde.right)]
        J_ic = flat(b_ic, 2) * flat(sc.ic, 1).unsqueeze(-1)  # linear rows: constant Jacobian (B, K, Q, N)
        self.J_ic, self.r_ic0 = J_ic, -flat(target, 1) * flat(sc.ic, 1)
        self.A_ic = J_ic.transpose(-1, -2) @ J_ic
        self.C = None if coupling is None else coupling.detach().reshape(B, coupling.shape[-3], K * N)
        self.CtC = None if self.C is None else self.C.transpose(-1, -2) @ self.C
        self.B, self.K, self.N = B, K, N

    def subset(self, idx: Tensor) -> _Structured:
        """The problems ``idx`` (a 1-D index into ``B``)."""
        sub = _Structured(self.pde, None, self.ridge, 0.0, 0.0, None)
        sub.groups = [g.subset(idx) for g in self.groups]
        sub.J_ic, sub.r_ic0, sub.A_ic = self.J_ic[idx], self.r_ic0[idx], self.A_ic[idx]
        sub.C = None if self.C is None else self.C[idx]
        sub.CtC = None if self.CtC is None else self.CtC[idx]
        sub.B, sub.K, sub.N = int(idx.numel()), self.K, self.N
        return sub

    def _ic(self, w: Tensor) -> Tensor:
        return (self.J_ic @ w.unsqueeze(-1)).squeeze(-1) + self.r_ic0

    def cost(self, z: Tensor) -> Tensor:
        """``½‖r(z)‖²`` per problem, ``(B,)``."""
        w = z.reshape(self.B, self.K, self.N)
        total = self.ridge ** 2 * (w * w).sum(-1) + self._ic(w).pow(2).sum(-1)
        for grp in self.groups:
            total = total + (grp.F(_as_fields(_fields(grp.b, w))) * grp.s).pow(2).sum(-1)
        total = 0.5 * total.sum(-1)
        if self.C is not None:
            total = total + 0.5 * (self.C @ z.unsqueeze(-1)).squeeze(-1).pow(2).sum(-1)
        return total

    def linearize(self, z: Tensor, *, second_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(½‖r‖² (B,), M (B, n, n), Jᵀr (B, n))`` at ``z (B, n)``.

        ``M = JᵀJ``, or with ``second_order`` the exact Hessian ``JᵀJ + Σᵢ rᵢ ∇²rᵢ`` (the rows are
        ``rᵢ = sᵢ 𝓕(Bᵢ w)``, so ``∇²rᵢ = sᵢ Bᵢᵀ ∇²𝓕 Bᵢ`` with the 4×4 Hessian of the pointwise ``𝓕``).
        """
        B, K, N = self.B, self.K, self.N
        w = z.reshape(B, K, N)
        eye = torch.eye(N, dtype=z.dtype, device=z.device)
        r_ic = self._ic(w)
        A = self.A_ic + self.ridge ** 2 * eye
        g = (self.J_ic.transpose(-1, -2) @ r_ic.unsqueeze(-1)).squeeze(-1) + self.ridge ** 2 * w
        cost = 0.5 * (r_ic.pow(2).sum(-1) + self.ridge ** 2 * (w * w).sum(-1))
        for grp in self.groups:
            r, dF, pairs = grp.partials(_fields(grp.b, w), second_order)
            r = r * grp.s
            J = ((dF * grp.s.unsqueeze(-1)).unsqueeze(-1) * grp.b).sum(-2)  # (B, K, P, N)
            A = A + J.transpose(-1, -2) @ J
            g = g + (J.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
            cost = cost + 0.5 * r.pow(2).sum(-1)
            for qa, qb, h in pairs:  # Σ_p s² 𝓕 ∂²𝓕/∂f_a∂f_b · B_aᵀ B_b
                A = A + (grp.b[..., qa, :] * (h * r * grp.s).unsqueeze(-1)).transpose(-1, -2) @ grp.b[..., qb, :]
        cost = cost.sum(-1)
        if K == 1 and self.C is None:
            return cost, A[:, 0], g[:, 0]
        A = torch.einsum("bkij,kl->bkilj", A, torch.eye(K, dtype=z.dtype, device=z.device)).reshape(B, K * N, K * N)
        g = g.reshape(B, K * N)
        if self.C is not None and self.CtC is not None:
            rc = (self.C @ z.unsqueeze(-1)).squeeze(-1)
            A = A + self.CtC
            g = g + (self.C.transpose(-1, -2) @ rc.unsqueeze(-1)).squeeze(-1)
            cost = cost + 0.5 * rc.pow(2).sum(-1)
        return cost, A, g


def _levenberg_marquardt(problem: _Structured, z0: Tensor, solver: LevenbergMarquardt,
                         callback: Callable[..., None] | None, newton: bool = False) -> Result:
    """Nielsen-damped LM on flat ``z (B, n)`` with the structured normal equations (the core's rules).

    With ``newton`` the step's curvature is the exact Hessian instead of ``JᵀJ``; a step is then
    only tried where ``H + μI`` is positive definite (elsewhere it counts as rejected, raising ``μ``).
    Residuals and Jacobians are only evaluated on a working set that shrinks to the active problems
    whenever at most half of it is still active.
    """
    z = z0
    c, A, g = problem.linearize(z, second_order=newton)
    rtol, atol = solver.tolerances(z.dtype)
    eps = torch.finfo(z.dtype).eps

    def small(cost: Tensor) -> Tensor:  # ‖r‖ <= atol: a zero-residual problem is solved
        return torch.sqrt(2 * cost.clamp_min(0)) <= atol

    tr = Tracker(torch.linalg.vector_norm(g, dim=-1), rtol=rtol, atol=atol, max_iter=solver.max_iter,
                 check_every=solver.check_every, callback=callback, nonfinite=~torch.isfinite(z).all(-1),
                 solved=small(c))
    mu = solver.damping * A.diagonal(dim1=-2, dim2=-1).amax(-1)
    mu = torch.where(mu > 0, mu, torch.full_like(mu, solver.damping))
    nu = torch.full_like(mu, 2.0)
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    work, sub = None, problem  # working set (None: all problems)

    def on_work(fn: Callable[[Tensor], Any], zz: Tensor, *fallback: Tensor) -> Any:  # fallback off the working set
        if work is None:
            return fn(zz)
        out = fn(zz[work])
        out = out if isinstance(out, tuple) else (out,)
        full = tuple(f.index_copy(0, work, o) for f, o in zip(fallback, out))
        return full if len(full) > 1 else full[0]

    for _ in tr:
        if tr.sync:
            n_work = problem.B if work is None else int(work.numel())
            active = tr.active.nonzero().squeeze(-1)
            if 0 < active.numel() <= n_work // 2:
                work, sub = active, problem.subset(active)
        damped = A + mu[:, None, None] * eye
        if newton:
            L, info = torch.linalg.cholesky_ex(damped)
            convex = info == 0
            L = masked(convex, L, eye.expand_as(L))
            h = torch.where(convex[:, None], torch.cholesky_solve(-g.unsqueeze(-1), L).squeeze(-1), torch.zeros_like(g))
        else:
            h = solve_or_pinv(damped, -g, tr.sync)
        z_try = z + h
        c_try = on_work(sub.cost, z_try, c)
        actual = c - c_try
        predicted = 0.5 * (h * (mu.unsqueeze(-1) * h - g)).sum(-1)
        # where ½‖r‖² cannot resolve the predicted gain, accept a step that does not increase it
        # beyond round-off and count it as ρ = 1 (as the core's LevenbergMarquardt does)
        slack = 10 * eps * c
        noisy = predicted <= 100 * slack
        rho = actual / torch.where(predicted > 0, predicted, torch.ones_like(predicted))
        rho = torch.where(noisy, torch.ones_like(rho), rho)
        ok = torch.isfinite(c_try) & torch.isfinite(actual) & torch.where(noisy, actual >= -slack, rho > 0)
        if newton:
            ok = ok & convex
        factor = (1 - (2 * rho - 1) ** 3).clamp_min(1 / 3)
        mu = torch.where(ok, mu * factor, mu * nu)
        mu = mu.clamp_min(torch.finfo(z.dtype).tiny)
        nu = torch.where(ok, torch.full_like(nu, 2.0), 2 * nu)
        z_new = masked(ok, z_try, z)
        if not tr.sync or bool((ok & tr.active).any()):
            c_new, A_new, g_new = on_work(lambda v: sub.linearize(v, second_order=newton), z_new, c, A, g)
        else:
            c_new, A_new, g_new = c, A, g
        tiny_step = torch.linalg.vector_norm(h, dim=-1) <= eps * (torch.linalg.vector_norm(z, dim=-1) + eps)
        if newton:
            tiny_step = tiny_step & convex
        stalled = (~torch.isfinite(mu) | (nu > 2.0 ** 60) | tiny_step) & ~ok
        take = tr.advance(torch.linalg.vector_norm(g_new, dim=-1), stalled=stalled, solved=small(c_new))
        z, c, A, g = masked(take, z_new, z), masked(take, c_new, c), masked(take, A_new, A), masked(take, g_new, g)
    return tr.finish(z)

r"""Collocation least squares for physics-informed hard constraints, with implicit gradients.

A network outputs ``N`` basis functions ``bₙ`` on a space–time grid; a *hard constraint* fits
``u = Σₙ wₙ bₙ`` to the physics by

.. math::
    w^* = \arg\min_w \tfrac12\|r(w; b)\|^2, \qquad
    r(w; b) = \begin{bmatrix}
        P^{-1/2}\,\mathcal F(u, u_t, u_x, u_{xx})(p_i) \\
        \sqrt{λ_{ic}/Q}\,\big(u(x_j, 0) - u_0(x_j)\big) \\
        \sqrt{λ_{bc}/R}\,\mathcal B(u, u_x)(y_l) \\
        ρ\, w
    \end{bmatrix}

over ``P`` sampled collocation points (PDE rows), ``Q`` initial points and ``R`` boundary points,
plus a ridge ``ρ = 10⁻⁴`` (Chalapathi, Du & Krishnapriyan, ICLR 2024). The derivatives of ``u``
are finite differences of the basis, so the four fields at a row are ``B_i w`` with
``B_i ∈ ℝ^{4×N}``, and ``r`` is nonlinear in ``w`` only through the pointwise PDE operator
``𝓕`` (Burgers' advection, the sorption isotherm). Many such problems (samples × experts) are
solved at once.

**Solver.** A batched Levenberg–Marquardt with Nielsen's damping (the update rules of
:class:`~optlayers.implicit.LevenbergMarquardt`, whose config it takes), with the Jacobian
assembled from the structure, ``J_i = s_i Σ_q ∂_q𝓕(B_i w) B_{i,q}`` (one pointwise reverse pass
for the four partials of ``𝓕`` instead of ``N`` Jacobian-vector products through the whole
residual), and likewise the second-order term ``Σᵢ rᵢ∇²rᵢ = Σᵢ sᵢ² 𝓕ᵢ Bᵢᵀ∇²𝓕ᵢ Bᵢ``. By default the
damped step uses the exact Hessian (``step="newton"``: LM-damped Newton, quadratic local
convergence on these nonzero-residual problems, where classical LM, ``step="gauss_newton"``, is
only linear). Optional *coupling rows* ``C z`` (linear, e.g. continuity between neighbouring
experts) join ``K`` problems into one with ``K·N`` unknowns.

**Gradients** (:func:`optlayers.implicit.custom_root`): the solution satisfies ``G = Jᵀr = 0``,

.. math:: \frac{\partial w^*}{\partial b} = -\Big(J^\top J + \textstyle\sum_i r_i \nabla^2_w r_i\Big)^{-1}
          \frac{\partial G}{\partial b},

used exactly (``hessian="exact"``) or with the Gauss–Newton operator ``JᵀJ`` in place of the
Hessian (``hessian="gauss_newton"``: ``∂G/∂b`` stays exact, and the gradient is exact only when
``r`` is linear in ``w`` — the heat equation — or zero at ``w*``). By default the ``N × N``
operator is formed from the structure at ``w*`` and inverted in the forward pass, so that the
backward pass is a single vector–Jacobian product (see :func:`hard_constraint`); with an
:class:`~optlayers.implicit.ImplicitAdjoint` the adjoint system is solved matrix-free with
Hessian-vector products instead. The layers are not ``vmap``-able (they batch natively).

The constraint is a least-squares *projection*: with ``N`` unknowns and many rows the residual is
not zero. Every solve reports its inner optimality ``‖Jᵀr(w*)‖ / ‖Jᵀr(w₀)‖`` and the RMS of the
PDE, initial and boundary residuals (:class:`ConstraintReport`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..._result import Result, raise_if_failed, register_aux
from ...implicit import ImplicitAdjoint, LevenbergMarquardt, OneStepAdjoint, custom_root
from ...implicit.solvers._base import Tracker, masked
from ...implicit.solvers._steps import solve_or_pinv
from .finite_difference import Grid, point_derivatives
from .residuals import PDE1D, Fields

__all__ = [
    "Collocation", "ConstraintRows", "ConstraintReport", "sample_collocation", "gather_rows",
    "collocation_residual", "hard_constraint", "default_solver",
]

Hessian = Literal["exact", "gauss_newton"]
Step = Literal["newton", "gauss_newton"]


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Collocation:
    """Rows of ``K`` problems, as flat indices ``i·nt + j`` into the ``nx × nt`` grid.

    Each kind of row is padded to the longest problem; masks are False on padding.

    Attributes:
        pde: ``(K, P)`` PDE points (interior: ``0 < i < nx−1``, ``j > 0``); ``pde_mask`` ``(K, P)``.
        ic: ``(K, Q)`` initial points (``j = 0``); ``ic_mask`` ``(K, Q)``.
        left: ``(K, R)`` points on ``x = x_min`` (``i = 0``, ``j > 0``); ``left_mask`` ``(K, R)``.
        right: ``(K, R)`` points on ``x = x_max``; ``right_mask`` ``(K, R)``.
        nt: Number of time points of the grid (to recover ``i`` from a flat index).
    """

    pde: Tensor
    pde_mask: Tensor
    ic: Tensor
    ic_mask: Tensor
    left: Tensor
    left_mask: Tensor
    right: Tensor
    right_mask: Tensor
    nt: int

    @property
    def num_problems(self) -> int:
        """``K``."""
        return self.pde.shape[0]

    def select(self, lo: int, hi: int) -> Collocation:
        """The rows of problems ``lo..hi-1``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Collocation(**{k: (v[lo:hi] if isinstance(v, Tensor) else v) for k, v in fields.items()})  # type: ignore[arg-type]


def _pad(lists: list[Tensor], device: torch.device | None) -> tuple[Tensor, Tensor]:
    width = max([1] + [len(v) for v in lists])
    idx = torch.zeros(len(lists), width, dtype=torch.int64, device=device)
    mask = torch.zeros(len(lists), width, dtype=torch.bool, device=device)
    for k, v in enumerate(lists):
        idx[k, :len(v)] = v
        mask[k, :len(v)] = True
    return idx, mask


def sample_collocation(grid: Grid, regions: Tensor, n_points: int, *, global_conditions: bool = False,
                       generator: torch.Generator | None = None) -> Collocation:
    """Sample ``n_points`` PDE points per region and collect its initial and boundary points.

    Args:
        grid: The grid.
        regions: ``(K, nx, nt)`` bool, the points each problem owns (tiles of a router).
        n_points: PDE points per region, drawn without replacement from the region's interior points.
        global_conditions: Give every problem all initial and boundary points of the domain (the
            paper's choice) instead of those in its region.
        generator: Random generator (``None``: torch's global one). Ranks of an expert-parallel
            run must draw the same points: seed their generators identically.

    Returns:
        A :class:`Collocation`.

    Raises:
        ValueError: A region has fewer than ``n_points`` interior points.
    """
    if (not isinstance(regions, Tensor) or regions.dim() != 3 or tuple(regions.shape[1:]) != (grid.nx, grid.nt)
            or regions.dtype != torch.bool):
        raise ValueError(f"regions must be a bool tensor (K, {grid.nx}, {grid.nt})")
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise ValueError(f"n_points must be a positive int, got {n_points!r}")
    device = regions.device
    interior = torch.zeros(grid.nx, grid.nt, dtype=torch.bool, device=device)
    interior[1:-1, 1:] = True
    flat = torch.arange(grid.size, device=device).reshape(grid.nx, grid.nt)
    everywhere = torch.ones_like(interior)
    pde, ic, left, right = [], [], [], []
    for k in range(regions.shape[0]):
        reg = regions[k]
        cand = flat[reg & interior]
        if cand.numel() < n_points:
            raise ValueError(f"region {k} has {cand.numel()} interior points, fewer than n_points={n_points}; "
                             "lower n_points or refine the grid")
        pick = torch.randperm(cand.numel(), generator=generator)[:n_points].to(device)
        pde.append(cand[pick].sort().values)
        cond = everywhere if global_conditions else reg
        ic.append(flat[:, 0][cond[:, 0]])
        left.append(flat[0, 1:][cond[0, 1:]])
        right.append(flat[-1, 1:][cond[-1, 1:]])
    pde_idx, pde_mask = _pad(pde, device)
    ic_idx, ic_mask = _pad(ic, device)
    left_idx, left_mask = _pad(left, device)
    right_idx, right_mask = _pad(right, device)
    return Collocation(pde_idx, pde_mask, ic_idx, ic_mask, left_idx, left_mask, right_idx, right_mask, grid.nt)


@dataclasses.dataclass(frozen=True)
class ConstraintRows:
    """Basis values at the rows of a batch of problems (``*batch`` leading dimensions).

    Attributes:
        pde: ``(*batch, P, 4, N)`` — ``[b, b_t, b_x, b_xx]`` at the PDE points.
        ic: ``(*batch, Q, N)`` — ``b`` at the initial points.
        ic_target: ``(*batch, Q)`` — ``u₀`` there.
        left, right: ``(*batch, R, 4, N)`` — at the boundary points.
        pde_mask, ic_mask, left_mask, right_mask: Bool masks broadcastable to ``(*batch, rows)``;
            False rows are padding and are ignored.
    """

    pde: Tensor
    ic: Tensor
    ic_target: Tensor
    left: Tensor
    right: Tensor
    pde_mask: Tensor
    ic_mask: Tensor
    left_mask: Tensor
    right_mask: Tensor

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.pde.shape[:-3])

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The differentiable tensors ``(pde, ic, ic_target, left, right)``."""
        return self.pde, self.ic, self.ic_target, self.left, self.right


def gather_rows(basis: Tensor, u0: Tensor, colloc: Collocation, grid: Grid) -> ConstraintRows:
    """The basis and its finite-difference derivatives at the rows of ``colloc``.

    Derivatives are evaluated from the stencils of the sampled points only
    (:func:`~optlayers.solvers.pde.point_derivatives`), so cost and memory scale with the rows.

    Args:
        basis: ``(S, nx, nt, N)``.
        u0: Initial condition ``(S, nx)``.
        colloc: The rows of ``K`` problems.
        grid: The grid of the basis.

    Returns:
        :class:`ConstraintRows` with batch shape ``(S, K)`` (differentiable in ``basis`` and ``u0``).
    """
    if basis.dim() != 4 or tuple(basis.shape[1:3]) != (grid.nx, grid.nt):
        raise ValueError(f"basis must be (S, {grid.nx}, {grid.nt}, N), got {tuple(basis.shape)}")
    S = basis.shape[0]
    if tuple(u0.shape) != (S, grid.nx):
        raise ValueError(f"u0 must be (S, nx) = {(S, grid.nx)}, got {tuple(u0.shape)}")
    if colloc.nt != grid.nt:
        raise ValueError(f"collocation built for nt={colloc.nt}, the grid has nt={grid.nt}")
    flat = basis.reshape(S, grid.size, basis.shape[-1])
    ic_x = torch.div(colloc.ic, grid.nt, rounding_mode="floor")
    return ConstraintRows(
        pde=point_derivatives(basis, grid, colloc.pde), ic=flat[:, colloc.ic], ic_target=u0[:, ic_x],
        left=point_derivatives(basis, grid, colloc.left), right=point_derivatives(basis, grid, colloc.right),
        pde_mask=colloc.pde_mask, ic_mask=colloc.ic_mask, left_mask=colloc.left_mask,
        right_mask=colloc.right_mask)


# ---------------------------------------------------------------------------------------------
# residual
# ---------------------------------------------------------------------------------------------
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


def _pieces(pde: PDE1D, w: Tensor, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unscaled PDE, initial, left and right residuals at all (also padded) rows."""
    b_pde, b_ic, target, b_left, b_right = tensors
    r_pde = pde.interior(_as_fields(_fields(b_pde, w)))
    r_ic = torch.einsum("...qn,...n->...q", b_ic, w) - target
    return r_pde, r_ic, pde.left(_as_fields(_fields(b_left, w))), pde.right(_as_fields(_fields(b_right, w)))


def collocation_residual(pde: PDE1D, rows: ConstraintRows, *, ridge: float = 1e-4, ic_weight: float = 1.0,
                         bc_weight: float = 1.0) -> Callable[[Tensor, tuple[Tensor, ...]], Tensor]:
    """The residual ``r(w, tensors)`` of the module docstring (differentiable, ``torch.func``-ready).

    Args:
        pde: The problem.
        rows: Supplies the masks; its tensors are the second argument of the returned function.
        ridge, ic_weight, bc_weight: ``ρ``, ``λ_ic``, ``λ_bc``.

    Returns:
        ``r(w (*batch, N), rows.tensors) -> (*batch, P + Q + 2R + N)``.
    """
    sc = _Scales(rows, ic_weight, bc_weight)

    def residual(w: Tensor, tensors: tuple[Tensor, ...]) -> Tensor:
        r_pde, r_ic, r_left, r_right = _pieces(pde, w, tensors)
        parts = [r_pde * sc.pde, r_ic * sc.ic, r_left * sc.left, r_right * sc.right]
        batch = w.shape[:-1]
        return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts] + [ridge * w], dim=-1)

    return residual


def _coupled(residual: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Residual of ``K`` problems joined by linear rows ``C z``: ``z (*outer, K, N)``, ``C (*outer, M, K, N)``."""

    def joint(z: Tensor, tensors: tuple[Tensor, ...], C: Tensor) -> Tensor:
        r = residual(z, tensors)
        return torch.cat([r.flatten(-2), torch.einsum("...mkn,...kn->...m", C, z)], dim=-1)

    return joint


# ---------------------------------------------------------------------------------------------
# structured Levenberg–Marquardt
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# report and the differentiable solve
# ---------------------------------------------------------------------------------------------
@register_aux
@dataclasses.dataclass(frozen=True)
class ConstraintReport:
    """What a hard-constraint solve achieved, per problem (all detached, batch shape).

    Attributes:
        stationarity: Inner optimality ``‖Jᵀr(w*)‖₂ / ‖Jᵀr(w₀)‖₂`` (with coupling rows: of the
            joint problem, repeated for its ``K`` members).
        objective: ``½‖r(w*)‖²`` of the problem's own rows.
        pde_rms: RMS of the (unscaled) PDE residual at the constrained points.
        ic_rms: RMS of ``u − u₀`` at the initial points (0 where a problem has none).
        bc_rms: RMS of the boundary residuals (0 where a problem has none).
    """

    stationarity: Tensor
    objective: Tensor
    pde_rms: Tensor
    ic_rms: Tensor
    bc_rms: Tensor


def _rms(r: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(r.dtype).expand_as(r)
    return torch.sqrt((r * r * m).sum(-1) / m.sum(-1).clamp_min(1))


def _report(pde: PDE1D, rows: ConstraintRows, problem: _Structured, w: Tensor, w0: Tensor, sc: _Scales,
            ) -> ConstraintReport:
    with torch.no_grad():
        batch = rows.batch_shape
        w = w.detach().reshape(*batch, -1)
        n = problem.K * problem.N
        g = problem.linearize(w.reshape(-1, n))[2]
        g0 = problem.linearize(w0.detach().reshape(-1, n))[2]
        gn, g0n = torch.linalg.vector_norm(g, dim=-1), torch.linalg.vector_norm(g0, dim=-1)
        stat = torch.where(g0n > 0, gn / g0n.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(gn))
        stat = stat.reshape(batch) if problem.C is None else stat.reshape(batch[:-1]).unsqueeze(-1).expand(batch)
        tensors = tuple(t.detach() for t in rows.tensors)
        r_pde, r_ic, r_left, r_right = _pieces(pde, w, tensors)
        own = sum(0.5 * ((r * s) ** 2).sum(-1) for r, s in
                  ((r_pde, sc.pde), (r_ic, sc.ic), (r_left, sc.left), (r_right, sc.right)))
        objective = own + 0.5 * problem.ridge ** 2 * (w * w).sum(-1)
        bc = torch.cat([r_left, r_right], -1)
        bc_mask = torch.cat([rows.left_mask.expand_as(r_left), rows.right_mask.expand_as(r_right)], -1)
        return ConstraintReport(stationarity=stat, objective=objective, pde_rms=_rms(r_pde, rows.pde_mask),
                                ic_rms=_rms(r_ic, rows.ic_mask), bc_rms=_rms(bc, bc_mask))


def _check_weights(ridge: float, ic_weight: float, bc_weight: float) -> None:
    for name, v in (("ridge", ridge), ("ic_weight", ic_weight), ("bc_weight", bc_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def default_solver() -> LevenbergMarquardt:
    """The default inner solver: :class:`~optlayers.implicit.LevenbergMarquardt` with
    ``damping=1e-6`` (the normal equations are ill-conditioned, ``λ_min ≈ ρ²``, and the usual
    ``1e-3`` spends iterations shrinking the damping), ``max_iter=100``, ``rtol=1e-9`` (relative
    stationarity ``‖Jᵀr‖ / ‖Jᵀr(w₀)‖``; float64 round-off stalls near 1e-10) and ``atol=1e-12``."""
    return LevenbergMarquardt(damping=1e-6, max_iter=100, rtol=1e-9)


def hard_constraint(pde: PDE1D, rows: ConstraintRows, *, w0: Tensor | None = None, ridge: float = 1e-4,
                    ic_weight: float = 1.0, bc_weight: float = 1.0, coupling: Tensor | None = None,
                    solver: LevenbergMarquardt | None = None, step: Step = "newton", hessian: Hessian = "exact",
                    adjoint: ImplicitAdjoint | None = None, throw: bool = True,
                    callback: Callable[..., None] | None = None) -> Result[ConstraintReport]:
    r"""Solve a batch of hard-constraint problems ``w* = argmin ½‖r(w; b)‖²`` (module docstring).

    Gradients (``adjoint=None``, the default): with ``M`` the exact Hessian ``∂_w G`` at ``w*``
    (``hessian="exact"``) or ``JᵀJ`` (``"gauss_newton"``), formed from the row structure and
    inverted once in the forward pass, the solution is declared the root of the preconditioned
    condition ``M⁻¹ G(w, b) = 0`` (same root), whose ``w``-Jacobian is the identity at ``w*`` for
    the exact ``M``; so the backward pass is one vector–Jacobian product of ``G`` with respect to
    ``b``, ``b̄ = −(∂_b G)ᵀ M⁻ᵀ w̄`` (:class:`~optlayers.implicit.OneStepAdjoint` on the
    preconditioned condition): the implicit-function-theorem gradient, exact in the first
    derivative for ``"exact"``. Passing an :class:`~optlayers.implicit.ImplicitAdjoint` instead
    solves ``(∂_w G)ᵀ u = w̄`` with Hessian-vector products (slower; second derivatives are then
    exact too).

    Args:
        pde: The problem (:class:`~optlayers.solvers.pde.Heat`, ``Burgers``, ``DiffusionSorption``, ...).
        rows: Basis values at the rows (:func:`gather_rows`), batch shape ``*batch``.
        w0: Initial coefficients ``(*batch, N)`` (default zeros).
        ridge: ``ρ`` (default 1e-4).
        ic_weight, bc_weight: ``λ_ic``, ``λ_bc`` (default 1).
        coupling: Optional linear rows ``C`` of shape ``(*outer, M, K, N)`` with
            ``*batch = (*outer, K)``: the residual gains ``Σ_k C[..., k, :] w_k`` and the ``K``
            problems of each ``outer`` index are solved jointly (``K·N`` unknowns).
        solver: A :class:`~optlayers.implicit.LevenbergMarquardt` config (default
            :func:`default_solver`); its damping and stopping rules are applied to the structured
            normal equations.
        step: Curvature of the damped step ``(M + μI) h = −Jᵀr``: ``"newton"`` (default) uses the
            exact Hessian ``M = JᵀJ + Σ rᵢ∇²rᵢ`` (a step is tried only where ``M + μI`` is positive
            definite, otherwise ``μ`` grows), which converges quadratically near ``w*``;
            ``"gauss_newton"`` is classical Levenberg–Marquardt (``M = JᵀJ``), whose local rate is
            only linear when the residual at ``w*`` is not zero — the usual case here.
        hessian: ``"exact"`` (default) or ``"gauss_newton"`` operator in the implicit gradient.
        adjoint: ``None`` (the preconditioned one-step form above) or an
            :class:`~optlayers.implicit.ImplicitAdjoint`.
        throw: Raise :class:`~optlayers.ConvergenceError` when any problem fails.
        callback: Called as ``callback(iteration, residual)`` by the solver.

    Returns:
        :class:`~optlayers.Result`: ``solution`` ``w*`` ``(*batch, N)``, differentiable in
        ``rows.tensors`` and ``coupling``; flags of the batch shape (``residual`` is ``‖Jᵀr‖₂``;
        with coupling, of the joint problem, repeated); :class:`ConstraintReport` as ``aux``.

    Raises:
        ConvergenceError: ``throw`` and some problem did not meet the solver's tolerance.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Burgers
        >>> pde = Burgers(); grid = pde.grid(12, 8)
        >>> regions = torch.ones(1, 12, 8, dtype=torch.bool)
        >>> colloc = sample_collocation(grid, regions, 30, generator=torch.Generator().manual_seed(0))
        >>> basis = torch.randn(2, 12, 8, 5, dtype=torch.float64)
        >>> u0 = torch.zeros(2, 12, dtype=torch.float64)
        >>> res = hard_constraint(pde, gather_rows(basis, u0, colloc, grid))
        >>> res.solution.shape, bool(res.converged.all()), bool((res.aux.stationarity < 1e-8).all())
        (torch.Size([2, 1, 5]), True, True)
    """
    if not isinstance(pde, PDE1D):
        raise TypeError(f"pde must be a PDE1D (Heat, Burgers, DiffusionSorption, ...), got {type(pde).__name__}")
    _check_weights(ridge, ic_weight, bc_weight)
    if hessian not in ("exact", "gauss_newton"):
        raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
    if step not in ("newton", "gauss_newton"):
        raise ValueError(f"step must be 'newton' or 'gauss_newton', got {step!r}")
    solver = default_solver() if solver is None else solver
    if not isinstance(solver, LevenbergMarquardt):
        raise TypeError(f"solver must be a LevenbergMarquardt config, got {type(solver).__name__}")
    if adjoint is not None and not isinstance(adjoint, ImplicitAdjoint):
        raise TypeError(f"adjoint must be None or an ImplicitAdjoint, got {type(adjoint).__name__} "
                        "(the inner solver runs without autograd, so unrolling is not available)")
    batch, N = rows.batch_shape, rows.pde.shape[-1]
    dtype, device = rows.pde.dtype, rows.pde.device
    w0 = torch.zeros(*batch, N, dtype=dtype, device=device) if w0 is None else w0.detach().to(dtype)
    if tuple(w0.shape) != (*batch, N):
        raise ValueError(f"w0 must have shape {(*batch, N)}, got {tuple(w0.shape)}")
    if coupling is not None and (coupling.dim() != len(batch) + 2 or tuple(coupling.shape[-2:]) != batch[-1:] + (N,)
                                 or tuple(coupling.shape[:-3]) != batch[:-1]):
        raise ValueError(f"coupling must have shape (*outer, M, K, N) = {(*batch[:-1], 'M', *batch[-1:], N)}, "
                         f"got {tuple(coupling.shape)}")
    problem = _Structured(pde, rows, ridge, ic_weight, bc_weight, coupling)
    n = N if coupling is None else batch[-1] * N
    shape = batch if coupling is None else batch[:-1]  # one joint problem per outer index with coupling
    with torch.no_grad():
        flat = _levenberg_marquardt(problem, w0.reshape(-1, n), solver, callback, step == "newton")
        w_star = flat.solution.reshape(w0.shape)
        solved = Result(w_star, flat.converged.reshape(shape), flat.iterations.reshape(shape),
                        flat.residual.reshape(shape), flat.status.reshape(shape), ())  # custom_root needs aux != None
    residual = collocation_residual(pde, rows, ridge=ridge, ic_weight=ic_weight, bc_weight=bc_weight)
    full = residual if coupling is None else _coupled(residual)
    params: tuple[Any, ...] = (rows.tensors,) if coupling is None else (rows.tensors, coupling)
    adj: ImplicitAdjoint | OneStepAdjoint
    if adjoint is None:
        with torch.no_grad():
            M = problem.linearize(flat.solution, second_order=hessian == "exact")[1]
            M_inv = _inverse(M).reshape(*shape, n, n)
        optimality, adj = _preconditioned(_optimality(full, "exact"), M_inv, n), OneStepAdjoint()
    else:
        optimality, adj = _optimality(full, hessian), adjoint

    @custom_root(optimality, adjoint=adj, batch_ndim=len(shape))
    def run(z0: Tensor, *_: Any) -> Result:
        return solved

    res = run(w_star, *params)
    if coupling is not None:  # flags of the joint problem, repeated for its K members
        expand = lambda t: t.unsqueeze(-1).expand(batch)  # noqa: E731
        res = res.replace(converged=expand(res.converged), iterations=expand(res.iterations),
                          residual=expand(res.residual), status=expand(res.status))
    res = res.replace(aux=_report(pde, rows, problem, res.solution, w0, _Scales(rows, ic_weight, bc_weight)))
    return raise_if_failed(f"hard_constraint(LevenbergMarquardt, {type(pde).__name__})", res, throw,
                           tol=solver.tolerances(dtype)[0], max_iter=solver.max_iter)


def _inverse(M: Tensor) -> Tensor:
    """Batched inverse of symmetric ``M (B, n, n)``; the pseudo-inverse where ``M`` is singular."""
    inv, info = torch.linalg.inv_ex(M)
    bad = (info != 0) | ~torch.isfinite(inv).all(dim=-1).all(dim=-1)
    if bool(bad.any()):
        inv = torch.where(bad[:, None, None], torch.linalg.pinv(M, hermitian=True), inv)
    return inv


def _preconditioned(G: Callable[..., Tensor], M_inv: Tensor, n: int) -> Callable[..., Tensor]:
    """``M⁻¹ G(z, *params)`` for the flattened unknowns of each problem."""

    def F(z: Tensor, *params: Any) -> Tensor:
        g = G(z, *params)
        flat = g.reshape(*M_inv.shape[:-2], n, 1)
        return (M_inv @ flat).reshape(g.shape)

    return F


def _optimality(residual: Callable[..., Tensor], hessian: Hessian) -> Callable[..., Tensor]:
    """``G = Jᵀr`` (exact) or ``J(w̄)ᵀ r(w)`` with ``w̄ = w`` held fixed (Gauss–Newton)."""
    if hessian == "exact":
        def G(z: Tensor, *params: Any) -> Tensor:
            return torch.func.grad(lambda v: 0.5 * (residual(v, *params) ** 2).sum())(z)
    else:
        def G(z: Tensor, *params: Any) -> Tensor:
            pull = torch.func.vjp(lambda v: residual(v, *params), z.detach())[1]
            return pull(residual(z, *params))[0]
    G.symmetric = True  # type: ignore[attr-defined]
    G.positive_definite = True  # type: ignore[attr-defined]
    return G

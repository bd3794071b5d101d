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
from ._structured_lm import _as_fields, _fields, _levenberg_marquardt, _Scales, _Structured
from .finite_difference import Grid, point_derivatives
from .residuals import PDE1D

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

    A flat index ``p`` is the grid point ``(x_i, t_j)`` with ``i = ⌊p / nt⌋``, ``j = p mod nt``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Grid
        >>> grid = Grid(6, 5)
        >>> colloc = sample_collocation(grid, torch.ones(1, 6, 5, dtype=torch.bool), 8,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> colloc.num_problems, colloc.pde.shape
        (1, torch.Size([1, 8]))
        >>> i, j = colloc.pde // grid.nt, colloc.pde % grid.nt
        >>> bool(((i > 0) & (i < grid.nx - 1) & (j > 0)).all())  # interior points
        True
        >>> colloc.ic.tolist(), colloc.left.tolist(), colloc.right.tolist()  # j = 0; i = 0; i = nx − 1
        ([[0, 5, 10, 15, 20, 25]], [[1, 2, 3, 4]], [[26, 27, 28, 29]])
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

    Problem ``k`` gets ``n_points`` PDE points drawn uniformly without replacement from
    ``Ω_k ∩ {0 < i < nx − 1, j > 0}`` (``Ω_k = regions[k]``), the initial points ``{j = 0}`` and the
    boundary points ``{i = 0, j > 0}``, ``{i = nx − 1, j > 0}`` (within ``Ω_k``, or all of them with
    ``global_conditions``).

    Example:
        Two tiles splitting space in half: each gets its own PDE points and the initial points in
        its half; only the first touches the left boundary (the mask marks the other's as padding).

        >>> import torch
        >>> from optlayers.layers.physics import TileRouter
        >>> from optlayers.solvers.pde import Grid
        >>> grid = Grid(6, 5)
        >>> regions = TileRouter((2, 1)).regions(grid)
        >>> colloc = sample_collocation(grid, regions, 4, generator=torch.Generator().manual_seed(0))
        >>> colloc.pde.shape, colloc.ic.tolist()
        (torch.Size([2, 4]), [[0, 5, 10], [15, 20, 25]])
        >>> colloc.left_mask.all(-1).tolist()
        [True, False]
        >>> sample_collocation(grid, regions, 4, global_conditions=True).ic.shape
        torch.Size([2, 6])
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

    Row ``i`` of a PDE or boundary block is the matrix ``B_i ∈ ℝ^{4×N}`` of
    ``[b, b_t, b_x, b_xx]`` at its point, so the fields of ``u = Σₙ wₙ bₙ`` there are ``B_i w``; an
    initial row is ``b(x_j, 0) ∈ ℝ^N`` with target ``u₀(x_j)``.

    Attributes:
        pde: ``(*batch, P, 4, N)`` — ``[b, b_t, b_x, b_xx]`` at the PDE points.
        ic: ``(*batch, Q, N)`` — ``b`` at the initial points.
        ic_target: ``(*batch, Q)`` — ``u₀`` there.
        left, right: ``(*batch, R, 4, N)`` — at the boundary points.
        pde_mask, ic_mask, left_mask, right_mask: Bool masks broadcastable to ``(*batch, rows)``;
            False rows are padding and are ignored.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Grid
        >>> grid = Grid(6, 5)
        >>> colloc = sample_collocation(grid, torch.ones(1, 6, 5, dtype=torch.bool), 8,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> basis = torch.randn(2, 6, 5, 3, dtype=torch.float64)
        >>> rows = gather_rows(basis, torch.zeros(2, 6, dtype=torch.float64), colloc, grid)
        >>> rows.batch_shape, rows.pde.shape, rows.ic.shape, rows.left.shape
        ((2, 1), torch.Size([2, 1, 8, 4, 3]), torch.Size([2, 1, 6, 3]), torch.Size([2, 1, 4, 4, 3]))
        >>> w = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
        >>> torch.allclose(rows.ic @ w, (basis @ w)[:, None, :, 0])  # u(x_j, 0) = b(x_j, 0)·w
        True
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

    Raises:
        ValueError: Shapes of ``basis``, ``u0`` or ``colloc`` do not match ``grid``.

    With ``D = basis_derivatives(basis, grid)``, ``rows.pde[s, k, i] = D[s, p_{k,i}]`` for the PDE
    point ``p_{k,i}`` (likewise the boundary rows), ``rows.ic[s, k, j] = basis[s, p_{k,j}]`` and
    ``rows.ic_target[s, k, j] = u0[s, ⌊p_{k,j} / nt⌋]``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Grid, basis_derivatives
        >>> grid = Grid(6, 5)
        >>> colloc = sample_collocation(grid, torch.ones(1, 6, 5, dtype=torch.bool), 8,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> basis = torch.randn(2, 6, 5, 3, dtype=torch.float64)
        >>> rows = gather_rows(basis, torch.zeros(2, 6, dtype=torch.float64), colloc, grid)
        >>> D = basis_derivatives(basis, grid).reshape(2, 30, 4, 3)
        >>> torch.allclose(rows.pde[:, 0], D[:, colloc.pde[0]])
        True
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

    The blocks, in order: ``𝓕(B_i w)/√P`` (PDE), ``√(λ_ic/Q)(b_jᵀw − u₀(x_j))`` (initial),
    ``√(λ_bc/R_b) 𝓑(B_l w)`` (the left rows, then the right rows) and ``ρw`` (ridge), where ``P``,
    ``Q`` and ``R_b`` count the unmasked PDE, initial and (left plus right) boundary rows; padded
    rows are zero.

    Example:
        >>> import math, torch
        >>> from optlayers.solvers.pde import Fields, Grid, Heat
        >>> grid = Grid(6, 5); pde = Heat()
        >>> colloc = sample_collocation(grid, torch.ones(1, 6, 5, dtype=torch.bool), 8,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> rows = gather_rows(torch.randn(2, 6, 5, 3, dtype=torch.float64),
        ...                    torch.zeros(2, 6, dtype=torch.float64), colloc, grid)
        >>> r = collocation_residual(pde, rows, ridge=1e-4)
        >>> w = torch.ones(2, 1, 3, dtype=torch.float64)
        >>> out = r(w, rows.tensors)
        >>> out.shape  # P + Q + 2R + N = 8 + 6 + 2·4 + 3
        torch.Size([2, 1, 25])
        >>> fields = Fields(*(rows.pde @ w[..., None, :, None]).squeeze(-1).unbind(-1))
        >>> torch.allclose(out[..., :8], pde.interior(fields) / math.sqrt(8)), torch.equal(out[..., -3:], 1e-4 * w)
        (True, True)
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

    An RMS is ``(Σ_{i ∈ rows} rᵢ² / #rows)^{1/2}`` over a problem's unmasked rows, for
    ``u = Σₙ w*ₙ bₙ``; the inner solve is trustworthy when ``stationarity`` is far below 1.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Grid, Heat
        >>> grid = Grid(6, 5)
        >>> colloc = sample_collocation(grid, torch.ones(1, 6, 5, dtype=torch.bool), 8,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> rows = gather_rows(torch.randn(2, 6, 5, 3, dtype=torch.float64),
        ...                    torch.zeros(2, 6, dtype=torch.float64), colloc, grid)
        >>> report = hard_constraint(Heat(), rows).aux
        >>> report.pde_rms.shape, bool((report.stationarity < 1e-8).all())
        (torch.Size([2, 1]), True)
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
    stationarity ``‖Jᵀr‖ / ‖Jᵀr(w₀)‖``; float64 round-off stalls near 1e-10) and ``atol=1e-12``
    (the solver's float64 default, ``atol=None``).

    A problem stops when ``‖Jᵀr(w)‖ ≤ atol + rtol · ‖Jᵀr(w₀)‖`` (or ``‖r(w)‖ ≤ atol``); each step
    solves ``(M + μI) h = −Jᵀr`` with the damping started at ``μ₀ = damping · maxᵢ Mᵢᵢ`` (see
    :func:`hard_constraint`).

    Example:
        >>> s = default_solver()
        >>> type(s).__name__, s.damping, s.max_iter, s.rtol
        ('LevenbergMarquardt', 1e-06, 100, 1e-09)
    """
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

r"""``PhysicsConstrainedMoE``: one hard constraint per tile of the domain (PI-HC-MoE).

Chalapathi, Du & Krishnapriyan (ICLR 2024) split the space–time domain into ``K`` tiles; expert
``k`` fits its own coefficients ``w_k`` of the shared learned basis to the physics on its own
collocation points,

.. math:: w_k^* = \arg\min_w \tfrac12\|r_k(w; b)\|^2, \qquad
          u(x, t) = \sum_k φ_k(x, t) \sum_n w^*_{k,n} b_n(x, t),

where ``φ_k`` is the indicator of tile ``k`` (the paper) or, with overlapping tiles, a smooth
partition of unity (:class:`TileRouter`). The ``K`` problems are independent, so they are solved
as one batched Levenberg–Marquardt problem over ``(sample, expert)`` and differentiated by the
implicit function theorem per expert (:func:`~optlayers.solvers.pde.hard_constraint`).

Options:

* ``overlap`` (router): tiles extend ``overlap`` grid points past their edges and are blended by a
  C¹ partition of unity, so the assembled field has no jump.
* ``continuity_weight > 0``: rows ``√(λ_c/I)·(u_k − u_k')`` and ``√(λ_c/I)·h·(∂u_k − ∂u_k')`` on
  the two grid lines of every interface (``∂ = ∂_x`` across an ``x``-interface, ``∂_t`` across a
  ``t``-interface). They couple the experts, which are then solved jointly (``K·N`` unknowns per
  sample): the cost of a single constraint with ``K·N`` basis functions.
* ``process_group``: expert parallelism over ``torch.distributed`` — each rank solves a contiguous
  block of experts, the ``(S, K_local, N)`` coefficients are all-gathered (detached) and the field
  is assembled on every rank; gradients flow only through the local experts, scaled by the world
  size so that gradient *averaging* (DDP) gives exactly the single-process gradient. All ranks
  must pass the same basis (a replicated network on the same batch) and draw the same points.

The interface jump ``max |u_k − u_k'|`` over the interface lines is reported per sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..._result import Result, raise_if_failed
from ...distributed import all_gather_with_sizes, is_distributed, rank, resolve_group, world_size
from ...implicit import ImplicitAdjoint, LevenbergMarquardt
from ...solvers.pde import PDE1D, Grid, point_derivatives
from ...solvers.pde.collocation import (
    Collocation,
    _check_weights,
    default_solver,
    gather_rows,
    hard_constraint,
    sample_collocation,
)
from .baselines import soft_constraint_loss
from .hard_constraint import PhysicsReport, _check_basis

__all__ = ["TileRouter", "PhysicsConstrainedMoE", "Interfaces", "expert_blocks"]

Hessian = Literal["exact", "gauss_newton"]
Step = Literal["newton", "gauss_newton"]


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous, nearly equal index ranges covering ``0..n-1`` (like ``numpy.array_split``)."""
    q, r = divmod(n, k)
    out, lo = [], 0
    for i in range(k):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


def expert_blocks(num_experts: int, world: int) -> list[tuple[int, int]]:
    """The contiguous block ``[lo, hi)`` of experts owned by each of ``world`` ranks.

    With ``K = q·W + r`` (``0 ≤ r < W``), the first ``r`` ranks own ``q + 1`` experts and the others
    ``q``, in rank order (like ``numpy.array_split``).

    Raises:
        ValueError: Fewer experts than ranks.

    Example:
        >>> expert_blocks(5, 2), expert_blocks(4, 4)
        ([(0, 3), (3, 5)], [(0, 1), (1, 2), (2, 3), (3, 4)])
    """
    if num_experts < world:
        raise ValueError(f"expert parallelism needs at least one expert per rank: {num_experts} experts, "
                         f"{world} ranks")
    return _chunks(num_experts, world)


@dataclasses.dataclass(frozen=True)
class Interfaces:
    """Pairs of neighbouring experts and the grid points of their shared interface lines.

    Attributes:
        a, b: ``(I,)`` expert indices of each interface row (``a < b``).
        point: ``(I,)`` flat grid index ``i·nt + j`` (both grid lines next to the interface).
        axis: ``(I,)`` 2 for an ``x``-interface (derivative ``u_x``), 1 for a ``t``-interface (``u_t``).
        h: ``(I,)`` the grid step across the interface.

    Each row ``ι`` compares experts ``a_ι`` and ``b_ι`` at grid point ``p_ι``: the continuity rows
    are ``u_a(p_ι) − u_b(p_ι)`` and ``h_ι (∂u_a − ∂u_b)(p_ι)`` with ``∂ = ∂_x`` (``axis = 2``) or
    ``∂_t`` (``axis = 1``), the indices of ``(u, u_t, u_x, u_xx)``.

    Example:
        Two tiles split ``x`` between ``i = 3`` and ``i = 4`` on a ``8 × 4`` grid: both grid lines,
        four time points each.

        >>> from optlayers.solvers.pde import Grid
        >>> itf = TileRouter((2, 1)).interfaces(Grid(8, 4))
        >>> itf.count, itf.a.unique().tolist(), itf.b.unique().tolist(), itf.axis.unique().tolist()
        (8, [0], [1], [2])
        >>> itf.point.tolist()  # i·nt + j for i in (3, 4), j in 0..3
        [12, 13, 14, 15, 16, 17, 18, 19]
    """

    a: Tensor
    b: Tensor
    point: Tensor
    axis: Tensor
    h: Tensor

    @property
    def count(self) -> int:
        return int(self.a.numel())


@dataclasses.dataclass(frozen=True)
class TileRouter:
    r"""A fixed tiling of the ``nx × nt`` grid into ``K = kx·kt`` experts (not learned).

    Expert ``k = ix·kt + it`` owns the grid indices ``x ∈ [x_lo, x_hi)``, ``t ∈ [t_lo, t_hi)`` of
    a near-equal split (the paper's ``dimension_partition``: ``(4, 1)`` splits space in four).
    With ``overlap = o > 0`` every tile reaches ``o`` grid points past each interior edge and
    the experts are blended by the C¹ partition of unity

    .. math:: φ_k(i, j) = ψ_k^x(i)\,ψ_k^t(j),\qquad
              ψ(i) = S\Big(\operatorname{clip}\big(\tfrac{c + o - i}{2o}, 0, 1\big)\Big)\ \text{at an upper edge } c,

    (``S(a) = 3a² − 2a³``, so that ``S(a) + S(1 − a) = 1``), which sums to one everywhere.

    Attributes:
        splits: ``(kx, kt)`` tiles along space and time (default ``(4, 1)``).
        overlap: Grid points each tile extends past its interior edges (default 0: indicators).

    Example:
        >>> from optlayers.solvers.pde import Grid
        >>> r = TileRouter((2, 1), overlap=2)
        >>> w = r.weights(Grid(8, 4))
        >>> w.shape, bool(torch.allclose(w.sum(0), torch.ones(8, 4, dtype=torch.float64)))
        (torch.Size([2, 8, 4]), True)
    """

    splits: tuple[int, int] = (4, 1)
    overlap: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        sp = tuple(self.splits)
        if len(sp) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sp):
            raise ValueError(f"TileRouter: splits must be two positive ints (kx, kt), got {self.splits!r}")
        object.__setattr__(self, "splits", sp)
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 0:
            raise ValueError(f"TileRouter: overlap must be an int >= 0, got {self.overlap!r}")

    @property
    def num_experts(self) -> int:
        """``K = kx·kt``."""
        return self.splits[0] * self.splits[1]

    def tiles(self, grid: Grid) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """``[((x_lo, x_hi), (t_lo, t_hi))]`` per expert (the non-overlapping cores)."""
        kx, kt = self.splits
        if grid.nx < 2 * kx or grid.nt < 2 * kt:
            raise ValueError(f"grid {grid.nx}x{grid.nt} too small for {kx}x{kt} tiles")
        xs, ts = _chunks(grid.nx, kx), _chunks(grid.nt, kt)
        return [(xs[ix], ts[it]) for ix in range(kx) for it in range(kt)]

    def _weights_1d(self, n: int, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
        i = torch.arange(n, dtype=dtype)
        o = self.overlap
        if o == 0:
            return ((i >= lo) & (i < hi)).to(dtype)
        w = torch.ones(n, dtype=dtype)
        if lo > 0:
            a = ((i - (lo - 0.5) + o) / (2 * o)).clamp(0, 1)
            w = w * (3 * a ** 2 - 2 * a ** 3)
        if hi < n:
            a = (((hi - 0.5) + o - i) / (2 * o)).clamp(0, 1)
            w = w * (3 * a ** 2 - 2 * a ** 3)
        return w

    def weights(self, grid: Grid, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> Tensor:
        """Partition of unity ``φ`` of shape ``(K, nx, nt)`` (indicators when ``overlap = 0``)."""
        out = []
        for (xl, xh), (tl, th) in self.tiles(grid):
            out.append(self._weights_1d(grid.nx, xl, xh, dtype)[:, None] * self._weights_1d(grid.nt, tl, th, dtype))
        w = torch.stack(out)
        return (w / w.sum(0, keepdim=True)).to(device)

    def regions(self, grid: Grid, device: torch.device | str | None = None) -> Tensor:
        """Points each expert owns, ``(K, nx, nt)`` bool (``φ_k > 0``)."""
        return self.weights(grid, device=device) > 0

    def interfaces(self, grid: Grid, device: torch.device | str | None = None) -> Interfaces:
        """The :class:`Interfaces` between neighbouring tiles (both grid lines next to each edge)."""
        kx, kt = self.splits
        tiles = self.tiles(grid)
        a, b, pts, axis, h = [], [], [], [], []
        for ix in range(kx):
            for it in range(kt):
                k = ix * kt + it
                (xl, xh), (tl, th) = tiles[k]
                if ix + 1 < kx:  # x-interface between index xh-1 and xh, over the tile's t range
                    for i in (xh - 1, xh):
                        for j in range(tl, th):
                            a.append(k)
                            b.append(k + kt)
                            pts.append(i * grid.nt + j)
                            axis.append(2)
                            h.append(grid.dx)
                if it + 1 < kt:  # t-interface between index th-1 and th, over the tile's x range
                    for j in (th - 1, th):
                        for i in range(xl, xh):
                            a.append(k)
                            b.append(k + 1)
                            pts.append(i * grid.nt + j)
                            axis.append(1)
                            h.append(grid.dt)
        as_long = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        return Interfaces(as_long(a), as_long(b), as_long(pts), as_long(axis),
                          torch.tensor(h, dtype=torch.float64, device=device))


def _interface_values(B: Tensor, w: Tensor, itf: Interfaces) -> tuple[Tensor, Tensor]:
    """``(u_a − u_b, ∂u_a − ∂u_b)`` at the interface points, each ``(S, I)``; ``B (S, I, 4, N)``."""
    diff = w[:, itf.a] - w[:, itf.b]  # (S, I, N)
    f = torch.einsum("siqn,sin->siq", B, diff)
    d = f.gather(-1, itf.axis.expand(f.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return f[..., 0], d


class PhysicsConstrainedMoE(nn.Module):
    r"""Mixture of physics-constrained experts over a tiling of the domain (module docstring).

    Args:
        pde: The problem.
        grid: The space–time grid of the basis.
        router: A :class:`TileRouter` (default ``TileRouter((4, 1))``) or ``(kx, kt)``.
        n_points: Total PDE collocation points, split evenly: each expert samples
            ``n_points // K`` in its own tile (default 1000).
        ridge, ic_weight, bc_weight: See :func:`~optlayers.solvers.pde.hard_constraint`.
        continuity_weight: ``λ_c`` of the interface-continuity rows (default 0: off; see above).
        global_conditions: Give every expert all initial and boundary rows (default True, as in the
            paper: the basis is global, so each expert's field then satisfies the initial and
            boundary data of the whole domain while its PDE rows stay in its tile). With False an
            expert sees only the rows inside its tile, and a tile touching no boundary is fitted
            without lateral conditions (at 32×16, four spatial experts on diffusion–sorption:
            27% test error instead of 7%).
        step: ``"newton"`` (default) or ``"gauss_newton"`` inner step (see
            :func:`~optlayers.solvers.pde.hard_constraint`).
        hessian: ``"exact"`` (default) or ``"gauss_newton"`` implicit gradient.
        solver: Inner :class:`~optlayers.implicit.LevenbergMarquardt` config (default
            :func:`~optlayers.solvers.pde.default_solver`).
        adjoint: ``None`` (default, see :func:`~optlayers.solvers.pde.hard_constraint`) or an
            :class:`~optlayers.implicit.ImplicitAdjoint`.
        throw: Raise :class:`~optlayers.ConvergenceError` when an expert's solve fails (on every
            rank, when distributed).
        solve_dtype: dtype of the solves (default float64; ``None``: the basis dtype).
        process_group: ``None`` (all experts on this process), ``"world"`` or a ``ProcessGroup``
            for expert parallelism (module docstring; not with ``continuity_weight > 0``).

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Heat
        >>> pde = Heat(); grid = pde.grid(16, 8)
        >>> moe = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=60)
        >>> res = moe.solve(torch.randn(3, 16, 8, 5, dtype=torch.float64), torch.zeros(3, 16, dtype=torch.float64))
        >>> res.solution.shape, res.aux.u.shape, res.aux.interface_jump.shape
        (torch.Size([3, 2, 5]), torch.Size([3, 16, 8]), torch.Size([3]))
    """

    def __init__(self, pde: PDE1D, grid: Grid, router: TileRouter | tuple[int, int] = TileRouter((4, 1)), *,
                 n_points: int = 1000, ridge: float = 1e-4, ic_weight: float = 1.0, bc_weight: float = 1.0,
                 continuity_weight: float = 0.0, global_conditions: bool = True, step: Step = "newton",
                 hessian: Hessian = "exact",
                 solver: LevenbergMarquardt | None = None, adjoint: ImplicitAdjoint | None = None,
                 throw: bool = True, solve_dtype: torch.dtype | None = torch.float64,
                 process_group: Any = None) -> None:
        super().__init__()
        if not isinstance(pde, PDE1D):
            raise TypeError(f"pde must be a PDE1D (Heat, Burgers, DiffusionSorption, ...), got {type(pde).__name__}")
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a Grid, got {type(grid).__name__}")
        router = router if isinstance(router, TileRouter) else TileRouter(tuple(router))  # type: ignore[arg-type]
        router.tiles(grid)  # validates the sizes
        _check_weights(ridge, ic_weight, bc_weight)
        _check_weights(0.0, continuity_weight, 0.0)
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < router.num_experts:
            raise ValueError(f"n_points must be an int >= the number of experts {router.num_experts}, got {n_points!r}")
        if continuity_weight > 0 and process_group is not None:
            raise ValueError("continuity rows couple the experts into one problem per sample; they cannot be "
                             "combined with expert parallelism (process_group)")
        self.pde, self.grid, self.router, self.n_points = pde, grid, router, n_points
        self.ridge, self.ic_weight, self.bc_weight = float(ridge), float(ic_weight), float(bc_weight)
        self.continuity_weight, self.global_conditions = float(continuity_weight), bool(global_conditions)
        if step not in ("newton", "gauss_newton"):
            raise ValueError(f"step must be 'newton' or 'gauss_newton', got {step!r}")
        self.hessian: Hessian = hessian
        self.step: Step = step
        self.solver = default_solver() if solver is None else solver
        self.adjoint, self.throw, self.solve_dtype = adjoint, bool(throw), solve_dtype
        self.process_group = process_group

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def extra_repr(self) -> str:
        kx, kt = self.router.splits
        return (f"{type(self.pde).__name__}, grid={self.grid.nx}x{self.grid.nt}, experts={kx}x{kt}, "
                f"overlap={self.router.overlap}, n_points={self.n_points}")

    def sample(self, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Collocation:
        """Draw the collocation rows of all experts (``n_points // K`` PDE points each)."""
        return sample_collocation(self.grid, self.router.regions(self.grid, device), self.n_points // self.num_experts,
                                  global_conditions=self.global_conditions, generator=generator)

    def _distributed(self) -> bool:
        return self.process_group is not None and is_distributed() and world_size(self.process_group) > 1

    def solve(self, basis: Tensor, u0: Tensor, *, collocation: Collocation | None = None,
              generator: torch.Generator | None = None, w0: Tensor | None = None) -> Result[PhysicsReport]:
        """Solve every expert and assemble the field.

        Args:
            basis: ``(S, nx, nt, N)``, shared by the experts.
            u0: Initial condition on the grid, ``(S, nx)``.
            collocation: Rows of the ``K`` experts (default :meth:`sample` with ``generator``).
            generator: Random generator of the sampling (identically seeded on every rank).
            w0: Initial coefficients ``(S, K, N)`` (default zeros).

        Returns:
            ``solution`` ``w*`` ``(S, K, N)`` (basis dtype), flags ``(S, K)`` and a
            :class:`~optlayers.layers.physics.PhysicsReport` whose ``u`` is the assembled field.
        """
        _check_basis(basis, u0, self.grid)
        S, K, N = basis.shape[0], self.num_experts, basis.shape[-1]
        sd = basis.dtype if self.solve_dtype is None else self.solve_dtype
        b = basis.to(sd)
        colloc = self.sample(generator, basis.device) if collocation is None else collocation
        if colloc.num_problems != K:
            raise ValueError(f"collocation has {colloc.num_problems} problems, the router {K} experts")
        itf = self.router.interfaces(self.grid, basis.device)
        lo, hi, world = 0, K, 1
        if self._distributed():
            world = world_size(self.process_group)
            lo, hi = expert_blocks(K, world)[rank(self.process_group)]
            colloc = colloc.select(lo, hi)
        rows = gather_rows(b, u0.to(sd), colloc, self.grid)
        at_itf = point_derivatives(b, self.grid, itf.point) if itf.count else None  # (S, I, 4, N)
        coupling = self._coupling(at_itf, itf, K) if self.continuity_weight > 0 and at_itf is not None else None
        res = hard_constraint(self.pde, rows, w0=None if w0 is None else w0[:, lo:hi].to(sd), ridge=self.ridge,
                              ic_weight=self.ic_weight, bc_weight=self.bc_weight, coupling=coupling,
                              solver=self.solver, step=self.step, hessian=self.hessian, adjoint=self.adjoint,
                              throw=False)
        rep = res.aux
        stats = [res.converged.to(sd), res.iterations.to(sd), res.residual, res.status.to(sd), rep.stationarity,
                 rep.objective, rep.pde_rms, rep.ic_rms, rep.bc_rms]
        w = res.solution
        if world > 1:
            local = torch.cat([w.detach(), torch.stack(stats, -1).detach()], -1)  # (S, K_loc, N + 9)
            gathered, _ = all_gather_with_sizes(local, dim=1, group=resolve_group(self.process_group))
            w_all, stats_all = gathered[..., :N], gathered[..., N:]
            # local experts keep their graph, with gradients scaled by the world size (DDP averages)
            w_local = w.detach() + world * (w - w.detach())
            w = torch.cat([w_all[:, :lo], w_local, w_all[:, hi:]], dim=1)
            stats = list(stats_all.unbind(-1))
        converged, iterations, residual, status = (stats[0] > 0.5, stats[1].to(torch.int64), stats[2],
                                                   stats[3].to(torch.int64))
        phi = self.router.weights(self.grid, sd, basis.device)
        expert_u = torch.einsum("sxtn,skn->skxt", b, w)
        u = (expert_u * phi).sum(1)
        with torch.no_grad():
            jump = (_interface_values(at_itf.detach(), w.detach(), itf)[0].abs().amax(-1) if at_itf is not None
                    else torch.zeros(S, dtype=sd, device=basis.device))
        aux = PhysicsReport(u=u.to(basis.dtype), expert_u=expert_u.to(basis.dtype), stationarity=stats[4],
                            objective=stats[5], pde_rms=stats[6],
                            ic_rms=stats[7], bc_rms=stats[8], interface_jump=jump)
        out = Result(w.to(basis.dtype), converged, iterations, residual, status, aux)
        return raise_if_failed(f"PhysicsConstrainedMoE(LevenbergMarquardt, {type(self.pde).__name__}, K={K})", out,
                               self.throw, tol=self.solver.tolerances(sd)[0], max_iter=self.solver.max_iter)

    def _coupling(self, B: Tensor, itf: Interfaces, K: int) -> Tensor:
        """Continuity rows ``C (S, 2I, K, N)``: ``s(u_a − u_b)`` and ``s·h(∂u_a − ∂u_b)``, ``s = √(λ_c / I)``;
        ``B (S, I, 4, N)`` holds the basis and its derivatives at the interface points."""
        S, N = B.shape[0], B.shape[-1]
        value = B[:, :, 0]
        slope = B.gather(2, itf.axis.view(1, -1, 1, 1).expand(S, -1, 1, N)).squeeze(2)
        slope = slope * itf.h.to(B.dtype)[None, :, None]
        rows = torch.cat([value, slope], 1) * (self.continuity_weight / itf.count) ** 0.5  # (S, 2I, N)
        sign = torch.zeros(2 * itf.count, K, dtype=B.dtype, device=B.device)
        idx = torch.arange(2 * itf.count, device=B.device)
        sign[idx, itf.a.repeat(2)] = 1.0
        sign[idx, itf.b.repeat(2)] = -1.0
        return rows[:, :, None, :] * sign[None, :, :, None]

    def weights(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """The router's partition of unity ``φ (K, nx, nt)`` on the grid."""
        return self.router.weights(self.grid, dtype, device)

    def physics_loss(self, result: Result[PhysicsReport], u0: Tensor, *, ic_weight: float = 1.0,
                     bc_weight: float = 1.0, reduction: str = "mean") -> Tensor:
        """The mixture's physics loss: every squared residual is ``Σ_k φ_k 𝓡(u_k)²`` over the experts'
        own fields (see :func:`~optlayers.layers.physics.soft_constraint_loss`), so that finite
        differences never straddle an interface jump."""
        eu = result.aux.expert_u
        return soft_constraint_loss(self.pde, eu, self.grid, u0, weights=self.weights(eu.dtype, eu.device),
                                    ic_weight=ic_weight, bc_weight=bc_weight, reduction=reduction)

    def forward(self, basis: Tensor, u0: Tensor, *, collocation: Collocation | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """The assembled field ``u (S, nx, nt)`` (dtype of ``basis``)."""
        return self.solve(basis, u0, collocation=collocation, generator=generator).aux.u

r"""``HardConstraintLayer``: a learned basis fitted to the physics by nonlinear least squares.

A network outputs ``N`` basis functions ``bₙ(x, t)`` on a space–time grid; the layer returns
``u = Σₙ wₙ* bₙ`` with

.. math:: w^* = \arg\min_w \tfrac12\|r(w; b)\|^2

over sampled PDE collocation rows, the initial and boundary rows and a small ridge (see
:mod:`optlayers.solvers.pde.collocation` for ``r``), solved by batched Levenberg–Marquardt in
float64 and differentiated with respect to the basis by the implicit function theorem on
``Jᵀr = 0`` — exactly by default, or with the Gauss–Newton operator ``JᵀJ``
(``hessian="gauss_newton"``, exact only when ``r`` is linear in ``w`` or zero at ``w*``).

The constraint is a least-squares projection, not an exact one: each solve reports its inner
optimality ``‖Jᵀr(w*)‖ / ‖Jᵀr(w₀)‖`` and the RMS PDE, initial and boundary residuals at the
constrained points (:class:`PhysicsReport`).

Reference: S. Chalapathi, Y. Du & A. Krishnapriyan, "Scaling physics-informed hard constraints
with mixture-of-experts", ICLR 2024.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..._result import Result, register_aux
from ...implicit import ImplicitAdjoint, LevenbergMarquardt
from ...solvers.pde import PDE1D, Grid
from ...solvers.pde.collocation import (
    Collocation,
    _check_weights,
    default_solver,
    gather_rows,
    hard_constraint,
    sample_collocation,
)
from .baselines import soft_constraint_loss

__all__ = ["HardConstraintLayer", "PhysicsReport"]

Hessian = Literal["exact", "gauss_newton"]
Step = Literal["newton", "gauss_newton"]


@register_aux
@dataclasses.dataclass(frozen=True)
class PhysicsReport:
    """Aux of :class:`HardConstraintLayer` and ``PhysicsConstrainedMoE`` solves.

    Attributes:
        u: The constrained field ``(S, nx, nt)`` (differentiable).
        expert_u: Each expert's own field ``Σₙ w*_{k,n} bₙ`` on the whole grid, ``(S, K, nx, nt)``
            (differentiable; ``u = Σ_k φ_k expert_u[:, k]``).
        stationarity, objective, pde_rms, ic_rms, bc_rms: As in
            :class:`~optlayers.solvers.pde.ConstraintReport`, shape ``(S, K)`` (``K = 1`` for
            :class:`HardConstraintLayer`).
        interface_jump: ``(S,)`` largest ``|u_k − u_k'|`` between adjacent experts on their shared
            interface lines (0 for a single expert).

    With ``φ_k`` the router's partition of unity, ``u = Σ_k φ_k u_k`` and ``u_k = Σₙ w*_{k,n} bₙ``;
    ``interface_jump = max_{(k,k',p)} |u_k(p) − u_{k'}(p)|`` over the interface points ``p``.

    Example:
        >>> import torch
        >>> from optlayers.layers.physics import PhysicsConstrainedMoE, TileRouter
        >>> from optlayers.solvers.pde import Heat
        >>> pde = Heat(); grid = pde.grid(16, 8)
        >>> moe = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=40)
        >>> basis = torch.randn(2, 16, 8, 4, dtype=torch.float64)
        >>> report = moe.solve(basis, torch.zeros(2, 16, dtype=torch.float64)).aux
        >>> report.u.shape, report.expert_u.shape, report.stationarity.shape, report.interface_jump.shape
        (torch.Size([2, 16, 8]), torch.Size([2, 2, 16, 8]), torch.Size([2, 2]), torch.Size([2]))
        >>> torch.allclose(report.u, (moe.router.weights(grid) * report.expert_u).sum(1))
        True
    """

    u: Tensor
    expert_u: Tensor
    stationarity: Tensor
    objective: Tensor
    pde_rms: Tensor
    ic_rms: Tensor
    bc_rms: Tensor
    interface_jump: Tensor


class HardConstraintLayer(nn.Module):
    r"""One physics-informed hard constraint over the whole domain (module docstring).

    ``forward(basis, u0)`` samples ``n_points`` PDE points, solves for ``w*`` per sample in
    ``solve_dtype`` (float64 by default, whatever the basis dtype) and returns
    ``u = Σₙ wₙ* bₙ`` on the grid, differentiable in ``basis`` (and ``u0``) by the implicit
    function theorem. It is the ``K = 1`` baseline of
    :class:`~optlayers.layers.physics.PhysicsConstrainedMoE`; with a network that outputs
    ``K·N`` functions it is the equal-unknowns baseline.

    Args:
        pde: The problem.
        grid: The space–time grid of the basis.
        n_points: PDE collocation points (default 1000).
        ridge, ic_weight, bc_weight: See :func:`hard_constraint`.
        step: ``"newton"`` (default) or ``"gauss_newton"`` inner step (see
            :func:`~optlayers.solvers.pde.hard_constraint`).
        hessian: ``"exact"`` (default) or ``"gauss_newton"`` implicit gradient.
        solver: Inner solver (default :class:`LevenbergMarquardt`, ``max_iter=100``).
        adjoint: Gradient mode (default implicit).
        throw: Raise :class:`~optlayers.ConvergenceError` when a solve fails.
        solve_dtype: dtype of the solve (default float64; ``None``: the basis dtype).

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Heat
        >>> pde = Heat(); grid = pde.grid(16, 8)
        >>> layer = HardConstraintLayer(pde, grid, n_points=50)
        >>> basis = torch.randn(3, 16, 8, 4, requires_grad=True)
        >>> u = layer(basis, torch.zeros(3, 16))
        >>> u.shape, u.dtype
        (torch.Size([3, 16, 8]), torch.float32)
    """

    def __init__(self, pde: PDE1D, grid: Grid, *, n_points: int = 1000, ridge: float = 1e-4,
                 ic_weight: float = 1.0, bc_weight: float = 1.0, step: Step = "newton", hessian: Hessian = "exact",
                 solver: LevenbergMarquardt | None = None, adjoint: ImplicitAdjoint | None = None,
                 throw: bool = True, solve_dtype: torch.dtype | None = torch.float64) -> None:
        super().__init__()
        if not isinstance(pde, PDE1D):
            raise TypeError(f"pde must be a PDE1D (Heat, Burgers, DiffusionSorption, ...), got {type(pde).__name__}")
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a Grid, got {type(grid).__name__}")
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
        _check_weights(ridge, ic_weight, bc_weight)
        self.pde, self.grid, self.n_points = pde, grid, int(n_points)
        self.ridge, self.ic_weight, self.bc_weight = float(ridge), float(ic_weight), float(bc_weight)
        if step not in ("newton", "gauss_newton"):
            raise ValueError(f"step must be 'newton' or 'gauss_newton', got {step!r}")
        self.hessian: Hessian = hessian
        self.step: Step = step
        self.solver = default_solver() if solver is None else solver
        self.adjoint, self.throw, self.solve_dtype = adjoint, bool(throw), solve_dtype

    def extra_repr(self) -> str:
        return f"{type(self.pde).__name__}, grid={self.grid.nx}x{self.grid.nt}, n_points={self.n_points}"

    def sample(self, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Collocation:
        """Draw the collocation rows (whole domain, one problem)."""
        regions = torch.ones(1, self.grid.nx, self.grid.nt, dtype=torch.bool, device=device)
        return sample_collocation(self.grid, regions, self.n_points, generator=generator)

    def solve(self, basis: Tensor, u0: Tensor, *, collocation: Collocation | None = None,
              generator: torch.Generator | None = None, w0: Tensor | None = None) -> Result[PhysicsReport]:
        """Solve and return the full :class:`~optlayers.Result`.

        Args:
            basis: ``(S, nx, nt, N)``.
            u0: Initial condition on the grid, ``(S, nx)``.
            collocation: Rows to use (default: :meth:`sample` with ``generator``).
            generator: Random generator for the sampling.
            w0: Initial coefficients ``(S, N)``.

        Returns:
            ``solution`` ``w*`` ``(S, N)`` in the basis dtype, flags ``(S,)``, and a
            :class:`PhysicsReport` (its per-expert fields have shape ``(S, 1)``).
        """
        _check_basis(basis, u0, self.grid)
        sd = basis.dtype if self.solve_dtype is None else self.solve_dtype
        b = basis.to(sd)
        colloc = self.sample(generator, basis.device) if collocation is None else collocation
        rows = gather_rows(b, u0.to(sd), colloc, self.grid)
        res = hard_constraint(self.pde, rows, w0=None if w0 is None else w0.to(sd).unsqueeze(1), ridge=self.ridge,
                              ic_weight=self.ic_weight, bc_weight=self.bc_weight, solver=self.solver, step=self.step,
                              hessian=self.hessian, adjoint=self.adjoint, throw=self.throw)
        w = res.solution  # (S, 1, N)
        u = torch.einsum("sxtn,sn->sxt", b, w[:, 0])
        rep = res.aux
        aux = PhysicsReport(u=u.to(basis.dtype), expert_u=u.unsqueeze(1).to(basis.dtype),
                            stationarity=rep.stationarity, objective=rep.objective,
                            pde_rms=rep.pde_rms, ic_rms=rep.ic_rms, bc_rms=rep.bc_rms,
                            interface_jump=torch.zeros(basis.shape[0], dtype=sd, device=basis.device))
        return Result(w[:, 0].to(basis.dtype), res.converged[:, 0], res.iterations[:, 0], res.residual[:, 0],
                      res.status[:, 0], aux)

    def physics_loss(self, result: Result[PhysicsReport], u0: Tensor, *, ic_weight: float = 1.0,
                     bc_weight: float = 1.0, reduction: str = "mean") -> Tensor:
        """The physics loss of the constrained field (:func:`~optlayers.layers.physics.soft_constraint_loss`)."""
        return soft_constraint_loss(self.pde, result.aux.u, self.grid, u0, ic_weight=ic_weight,
                                    bc_weight=bc_weight, reduction=reduction)

    def forward(self, basis: Tensor, u0: Tensor, *, collocation: Collocation | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """The constrained field ``u (S, nx, nt)`` (dtype of ``basis``)."""
        return self.solve(basis, u0, collocation=collocation, generator=generator).aux.u


def _check_basis(basis: Tensor, u0: Tensor, grid: Grid) -> None:
    if not isinstance(basis, Tensor) or basis.dim() != 4 or tuple(basis.shape[1:3]) != (grid.nx, grid.nt):
        shape: Any = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
        raise ValueError(f"basis must be (S, {grid.nx}, {grid.nt}, N), got {shape}")
    if not basis.is_floating_point():
        raise ValueError("basis must be a floating tensor")
    if not isinstance(u0, Tensor) or tuple(u0.shape) != (basis.shape[0], grid.nx):
        shape = tuple(u0.shape) if isinstance(u0, Tensor) else type(u0).__name__
        raise ValueError(f"u0 must be (S, nx) = {(basis.shape[0], grid.nx)}, got {shape}")

r"""Baselines of the physics-constrained layers: the soft-constraint (PINN) loss.

The *soft constraint* (PI-SC) trains a network whose output is the field ``u`` itself by
penalising the physics on the grid,

.. math:: L(u) = \underbrace{\operatorname{mean}_{\text{interior}} \mathcal F(u)^2}_{\text{PDE}}
          + λ_{ic} \operatorname{mean}_x\big(u(x, 0) - u_0(x)\big)^2
          + λ_{bc} \operatorname{mean}_t \tfrac12\big(\mathcal B_{left}(u)^2 + \mathcal B_{right}(u)^2\big),

with the derivatives of ``u`` taken by the same finite differences as the hard constraints
(interior: ``0 < i < nx − 1``, ``j > 0``). The same loss, applied to the output of
:class:`~optlayers.layers.physics.HardConstraintLayer`, is the physics-only training loss of the
hard-constrained models (Chalapathi et al. 2024 use no solution data). For a mixture, pass the
experts' own fields ``u_k`` (``(S, K, nx, nt)``) and the partition of unity ``φ_k``: each squared
residual becomes ``Σ_k φ_k 𝓡(u_k)²``, so finite differences never straddle an interface jump
(on the assembled field a jump ``δ`` costs ``~δ/dx²`` in ``u_xx`` and swamps the loss). The other baselines are
configurations of the layers themselves: one global hard constraint is ``HardConstraintLayer``
(or ``PhysicsConstrainedMoE`` with ``TileRouter((1, 1))``), fed ``N`` or ``K·N`` basis functions.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ...solvers.pde import PDE1D, Fields, Grid, space_time_derivatives

__all__ = ["PhysicsResiduals", "physics_residuals", "soft_constraint_loss"]


class PhysicsResiduals(NamedTuple):
    """Residuals of a field on its grid (see :func:`physics_residuals`).

    ``pde = 𝓕(u)`` at the interior points ``0 < i < nx − 1``, ``j > 0``; ``ic = u(x, 0) − u₀``;
    ``left = 𝓑_left(u)`` and ``right = 𝓑_right(u)`` at ``j > 0``. The shapes below are for a field
    ``(S, nx, nt)``; expert fields add a ``K`` dimension after ``S``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Heat, heat_exact
        >>> pde = Heat(); grid = pde.grid(32, 16)
        >>> u = heat_exact(pde, torch.tensor([[1.0]], dtype=torch.float64), grid)
        >>> r = physics_residuals(pde, u, grid, u[:, :, 0])
        >>> r._fields, [tuple(v.shape) for v in r]
        (('pde', 'ic', 'left', 'right'), [(1, 30, 15), (1, 32), (1, 15), (1, 15)])
    """

    pde: Tensor  # (S, nx - 2, nt - 1)
    ic: Tensor  # (S, nx)
    left: Tensor  # (S, nt - 1)
    right: Tensor  # (S, nt - 1)


def physics_residuals(pde: PDE1D, u: Tensor, grid: Grid, u0: Tensor) -> PhysicsResiduals:
    """PDE, initial and boundary residuals of a field by finite differences.

    Args:
        pde: The problem.
        u: The field ``(S, nx, nt)``, or the fields of ``K`` experts ``(S, K, nx, nt)``.
        grid: Its grid.
        u0: Initial condition ``(S, nx)``.

    Returns:
        :class:`PhysicsResiduals` (with a ``K`` dimension after ``S`` for expert fields).

    Raises:
        ValueError: ``u`` or ``u0`` does not match ``grid``.

    The derivatives are the second-order finite differences of
    :func:`~optlayers.solvers.pde.space_time_derivatives` (one-sided at the edges), so a smooth
    exact solution has PDE residuals ``O(dx² + dt²)`` and initial and Dirichlet rows at round-off.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Heat, heat_exact
        >>> pde = Heat(); grid = pde.grid(32, 16)
        >>> u = heat_exact(pde, torch.tensor([[1.0]], dtype=torch.float64), grid)
        >>> r = physics_residuals(pde, u, grid, u[:, :, 0])
        >>> float(r.pde.abs().max()) < 1e-3, float(r.ic.abs().max()), float(r.left.abs().max())
        (True, 0.0, 0.0)
    """
    if u.dim() not in (3, 4) or tuple(u.shape[-2:]) != (grid.nx, grid.nt):
        raise ValueError(f"u must be (S, {grid.nx}, {grid.nt}) or (S, K, {grid.nx}, {grid.nt}), got {tuple(u.shape)}")
    if tuple(u0.shape) != (u.shape[0], grid.nx):
        raise ValueError(f"u0 must be (S, nx) = {(u.shape[0], grid.nx)}, got {tuple(u0.shape)}")
    f = Fields(*space_time_derivatives(u, grid))
    interior = pde.interior(Fields(*(v[..., 1:-1, 1:] for v in f)))
    left = pde.left(Fields(*(v[..., 0, 1:] for v in f)))
    right = pde.right(Fields(*(v[..., -1, 1:] for v in f)))
    target = u0.to(u.dtype) if u.dim() == 3 else u0.to(u.dtype).unsqueeze(1)
    return PhysicsResiduals(interior, u[..., 0] - target, left, right)


def soft_constraint_loss(pde: PDE1D, u: Tensor, grid: Grid, u0: Tensor, *, weights: Tensor | None = None,
                         ic_weight: float = 1.0, bc_weight: float = 1.0, reduction: str = "mean") -> Tensor:
    """The physics (soft-constraint, PINN) loss of the module docstring.

    Args:
        pde: The problem.
        u: Field ``(S, nx, nt)``, or expert fields ``(S, K, nx, nt)`` with ``weights``.
        grid: Its grid.
        u0: Initial condition ``(S, nx)``.
        weights: Partition of unity ``φ (K, nx, nt)`` of expert fields (e.g.
            :meth:`PhysicsConstrainedMoE.weights`).
        ic_weight, bc_weight: ``λ_ic``, ``λ_bc`` (default 1).
        reduction: ``"mean"`` over samples (default) or ``"none"`` (shape ``(S,)``).

    Returns:
        The loss.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Heat, heat_exact
        >>> pde = Heat(); grid = pde.grid(64, 64)
        >>> a = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
        >>> u = heat_exact(pde, a, grid)
        >>> float(soft_constraint_loss(pde, u, grid, u[:, :, 0])) < 1e-4
        True
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if (u.dim() == 4) != (weights is not None):
        raise ValueError("pass weights (K, nx, nt) exactly when u holds expert fields (S, K, nx, nt)")
    r = physics_residuals(pde, u, grid, u0)
    sq = [r.pde.pow(2), r.ic.pow(2), r.left.pow(2), r.right.pow(2)]
    if weights is not None:
        if tuple(weights.shape) != (u.shape[1], grid.nx, grid.nt):
            raise ValueError(f"weights must be (K, nx, nt) = {(u.shape[1], grid.nx, grid.nt)}, "
                             f"got {tuple(weights.shape)}")
        phi = weights.to(u.dtype)
        parts = [phi[:, 1:-1, 1:], phi[:, :, 0], phi[:, 0, 1:], phi[:, -1, 1:]]
        sq = [(v * p).sum(1) for v, p in zip(sq, parts)]
    per = (sq[0].mean((-2, -1)) + ic_weight * sq[1].mean(-1) + bc_weight * 0.5 * (sq[2].mean(-1) + sq[3].mean(-1)))
    return per.mean() if reduction == "mean" else per

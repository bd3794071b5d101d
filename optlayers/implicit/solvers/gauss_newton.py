"""Gauss–Newton for batched nonlinear least squares ``min_z ½‖r(z)‖²``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, masked
from ._steps import batched_jacobian, line_search, merit, solve_or_pinv

__all__ = ["GaussNewton"]


def linearize(r: Fn, z: torch.Tensor, m: int | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residuals ``r(z)`` (B, m), Jacobians ``J`` (B, m, n) and gradients ``Jᵀr`` (B, n)."""
    rz = r(z)
    if rz.dim() != 2 or rz.shape[0] != z.shape[0] or (m is not None and rz.shape[1] != m):
        raise ValueError(f"the residual function r must return shape (B, m) with B = {z.shape[0]}, "
                         f"got {tuple(rz.shape)}")
    J = batched_jacobian(r, z, rz.shape[1])
    return rz, J, (J.transpose(-1, -2) @ rz.unsqueeze(-1)).squeeze(-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussNewton(IterativeSolver):
    r"""Gauss–Newton with a backtracking line search, for a batch of least-squares problems.

    Each element minimises ``½‖r_b(z_b)‖²`` with ``r: (B, n) -> (B, m)``. With the
    per-element Jacobian ``J_b`` (``(m, n)``, from ``min(m, n)`` vmapped JVPs or VJPs), the
    Gauss–Newton direction solves the normal equations

    .. math:: J_b^\top J_b\, d_b = -J_b^\top r_b

    (batched LU; minimum-norm least squares where ``JᵀJ`` is singular). With
    ``line_search=True`` the step backtracks on ``½‖r‖²`` (Armijo, ``c₁ = 1e-4``); an element
    whose backtracking fails stops with ``STAGNATION``. Convergence is quadratic on
    zero-residual problems and linear otherwise; prefer :class:`LevenbergMarquardt` when
    ``J`` may be rank-deficient.

    Residual: ``‖Jᵀr‖₂`` (stationarity of ``½‖r‖²``); converged when
    ``‖Jᵀr‖ <= atol + rtol · ‖Jᵀr(z0)‖`` or ``‖r‖ <= atol`` (zero-residual problems).

    Attributes:
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 100).
        line_search: Backtrack on ``½‖r‖²`` (default True).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``
            (one line-search trial per iteration, retried at the next if rejected).

    Example:
        >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> r = lambda z: z[:, :1] * torch.exp(z[:, 1:] * t) - 2 * torch.exp(-t)
        >>> res = GaussNewton().run_least_squares(r, torch.ones(2, 2, dtype=torch.float64))
        >>> [round(v, 6) for v in res.solution[0].tolist()]
        [2.0, -1.0]

    References:
        Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §10.3.
    """

    max_iter: int = 100
    line_search: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("line_search", bool)

    def run_least_squares(self, r: Fn, z0: torch.Tensor, *,
                          callback: Callback | None = None) -> Result:
        """Minimise ``½‖r(z)‖²`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        z = check_iterate(z0)
        rz, J, g = linearize(r, z)
        m, atol = rz.shape[1], self.tolerances(z.dtype)[1]

        def small(res: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(res, dim=-1) <= atol

        tr = self._tracker(torch.linalg.vector_norm(g, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1), solved=small(rz))
        evaluate, t_next = merit(r), torch.ones_like(tr.residual)
        for _ in tr:
            d = solve_or_pinv(J.transpose(-1, -2) @ J, -g, tr.sync)
            stalled = None
            if self.line_search:
                phi0, slope = 0.5 * (rz * rz).sum(-1), (g * d).sum(-1)
                descent = slope < 0
                d = masked(descent, d, -g)
                slope = torch.where(descent, slope, -(g * g).sum(-1))
                step = line_search(evaluate, z, d, phi0, slope, (phi0, rz), tr.active, t0=t_next,
                                   sync=tr.sync)
                z_new, t_next = step.z, torch.where(step.ok, 1.0, step.t_retry)
                stalled = ~step.ok if tr.sync else None
            else:
                z_new = z + d
            r_new, J_new, g_new = linearize(r, z_new, m)
            take = tr.advance(torch.linalg.vector_norm(g_new, dim=-1), stalled=stalled,
                              nonfinite=~torch.isfinite(z_new).all(-1), solved=small(r_new))
            z, rz = masked(take, z_new, z), masked(take, r_new, rz)
            J, g = masked(take, J_new, J), masked(take, g_new, g)
        return tr.finish(z)

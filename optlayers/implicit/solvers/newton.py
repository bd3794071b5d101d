"""Newton's method for batched nonlinear systems ``F(z) = 0``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, check_output, masked
from ._steps import batched_jacobian, line_search, merit, solve_or_pinv

__all__ = ["Newton"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Newton(IterativeSolver):
    r"""Newton's method with a backtracking line search, for a batch of root problems.

    Each element solves ``F_b(z_b) = 0`` with ``F: (B, n) -> (B, n)`` acting independently on
    the batch. Step: the per-element Jacobian ``J_b = ∂F_b/∂z_b`` (built from ``n`` vmapped
    forward-mode JVPs) gives the Newton direction

    .. math:: J_b d_b = -F_b(z_b)

    (batched LU; the minimum-norm least-squares direction ``-J_b^+ F_b`` where ``J_b`` is
    singular). With ``line_search=True`` the step ``z_b + t_b d_b`` backtracks on the merit
    ``φ_b = ½‖F_b‖²`` until the Armijo condition ``φ_b(z + t d) <= φ_b(z) + 10⁻⁴ t ∇φ_b·d``
    holds (``∇φ_b·d = -‖F_b‖²`` for an exact Newton direction); when the direction is not a
    descent direction the steepest-descent direction ``-J_bᵀF_b`` is used. Convergence is
    locally quadratic.

    Residual: ``‖F(z)‖₂``; converged when it is ``<= atol + rtol · ‖F(z0)‖₂``.

    Attributes:
        rtol: Relative tolerance (``None``: 1e-10 in float64, 1e-5 in float32).
        atol: Absolute tolerance (``None``: 1e-12 in float64, 1e-7 in float32).
        max_iter: Iteration limit (default 50).
        line_search: Backtrack on ``½‖F‖²`` (default True); False takes full Newton steps.
            With ``check_every=None`` each iteration makes one trial (no host sync), a
            rejected step being halved and retried at the next iteration.
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``.

    Example:
        >>> F = lambda z: z ** 3 - 8.0
        >>> res = Newton().run_root(F, torch.ones(2, 1, dtype=torch.float64))
        >>> [round(v, 8) for v in res.solution.flatten().tolist()], res.status.tolist()
        ([2.0, 2.0], [0, 0])

    References:
        Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §11.1–11.2.
    """

    max_iter: int = 50
    line_search: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("line_search", bool)

    def run_root(self, F: Fn, z0: torch.Tensor, *, callback: Callback | None = None) -> Result:
        """Solve ``F(z) = 0`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        z = check_iterate(z0)
        n = z.shape[1]
        Fz = check_output(F(z), tuple(z.shape), "F")
        tr = self._tracker(torch.linalg.vector_norm(Fz, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1))
        evaluate, t_next = merit(F), torch.ones_like(tr.residual)
        for _ in tr:
            J = batched_jacobian(F, z, n)
            d = solve_or_pinv(J, -Fz, tr.sync)
            stalled = None
            if self.line_search:
                phi0 = 0.5 * (Fz * Fz).sum(-1)
                grad = (J.transpose(-1, -2) @ Fz.unsqueeze(-1)).squeeze(-1)
                slope = (grad * d).sum(-1)
                descent = slope < 0
                d = masked(descent, d, -grad)
                slope = torch.where(descent, slope, -(grad * grad).sum(-1))
                step = line_search(evaluate, z, d, phi0, slope, (phi0, Fz), tr.active, t0=t_next,
                                   sync=tr.sync)
                z_new, F_new = step.z, step.values[1]
                t_next = torch.where(step.ok, 1.0, step.t_retry)
                stalled = ~step.ok if tr.sync else None
            else:
                z_new = z + d
                F_new = F(z_new)
            take = tr.advance(torch.linalg.vector_norm(F_new, dim=-1),
                              nonfinite=~torch.isfinite(z_new).all(-1), stalled=stalled)
            z, Fz = masked(take, z_new, z), masked(take, F_new, Fz)
        return tr.finish(z)

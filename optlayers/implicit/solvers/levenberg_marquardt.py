"""Levenberg–Marquardt with Nielsen's damping update for batched nonlinear least squares."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, masked
from ._steps import solve_or_pinv
from .gauss_newton import linearize

__all__ = ["LevenbergMarquardt"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LevenbergMarquardt(IterativeSolver):
    r"""Levenberg–Marquardt with Nielsen's adaptive damping, for a batch of least squares.

    Each element minimises ``½‖r_b(z_b)‖²`` (``r: (B, n) -> (B, m)``). The step solves

    .. math:: (J^\top J + μ I)\, h = -J^\top r,

    and is accepted when the gain ratio
    ``ρ = (½‖r(z)‖² - ½‖r(z + h)‖²) / (½ hᵀ(μ h - Jᵀr))`` is positive, after which
    ``μ ← μ · max(1/3, 1 - (2ρ - 1)³)`` and ``ν ← 2``; otherwise ``μ ← μ ν``, ``ν ← 2ν``
    (Nielsen 1999); where ``½‖r‖²`` cannot resolve the predicted gain (round-off), a step
    that does not increase it beyond round-off is accepted as ``ρ = 1``. Initially
    ``μ₀ = damping · max_i (JᵀJ)_{ii}``. An element stops with
    ``STAGNATION`` when ``ν`` overflows (no acceptable step) or the step is negligible,
    ``‖h‖ <= ε (‖z‖ + ε)``.

    Residual: ``‖Jᵀr‖₂``; converged when ``‖Jᵀr‖ <= atol + rtol · ‖Jᵀr(z0)‖`` or
    ``‖r‖ <= atol`` (zero-residual problems).

    Attributes:
        damping: ``τ`` in ``μ₀ = τ · max diag(JᵀJ)`` (default 1e-3).
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 200; rejected steps count as iterations).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``.

    Example:
        >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> r = lambda z: z[:, :1] * torch.exp(z[:, 1:] * t) - 2 * torch.exp(-t)
        >>> res = LevenbergMarquardt().run_least_squares(r, torch.ones(2, 2, dtype=torch.float64))
        >>> [round(v, 6) for v in res.solution[0].tolist()]
        [2.0, -1.0]

    References:
        H. B. Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05, DTU, 1999;
        K. Madsen, H. B. Nielsen & O. Tingleff, *Methods for Non-Linear Least Squares
        Problems*, 2nd ed., 2004, §3.2.
    """

    damping: float = 1e-3
    max_iter: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("damping", float, low=0.0, strict=True)

    def run_least_squares(self, r: Fn, z0: torch.Tensor, *,
                          callback: Callback | None = None) -> Result:
        """Minimise ``½‖r(z)‖²`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        z = check_iterate(z0)
        rz, J, g = linearize(r, z)
        m, atol = rz.shape[1], self.tolerances(z.dtype)[1]
        eps = torch.finfo(z.dtype).eps

        def small(res: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(res, dim=-1) <= atol

        tr = self._tracker(torch.linalg.vector_norm(g, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1), solved=small(rz))
        A = J.transpose(-1, -2) @ J
        mu = self.damping * A.diagonal(dim1=-2, dim2=-1).amax(-1)
        mu = torch.where(mu > 0, mu, torch.full_like(mu, self.damping))
        nu = torch.full_like(mu, 2.0)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        for _ in tr:
            h = solve_or_pinv(A + mu[:, None, None] * eye, -g, tr.sync)
            z_try = z + h
            r_try = r(z_try)
            phi = 0.5 * (rz * rz).sum(-1)
            actual = phi - 0.5 * (r_try * r_try).sum(-1)
            predicted = 0.5 * (h * (mu.unsqueeze(-1) * h - g)).sum(-1)
            # Where ½‖r‖² cannot resolve the predicted gain, accept any step that does not
            # increase it beyond round-off (the gain ratio is then noise) and count it as ρ = 1.
            slack = 10 * eps * phi
            noisy = predicted <= 100 * slack
            rho = actual / torch.where(predicted > 0, predicted, torch.ones_like(predicted))
            rho = torch.where(noisy, 1.0, rho)
            ok = torch.isfinite(r_try).all(-1) & torch.isfinite(actual) & (
                torch.where(noisy, actual >= -slack, rho > 0))
            factor = (1 - (2 * rho - 1) ** 3).clamp_min(1 / 3)
            mu = torch.where(ok, mu * factor, mu * nu)
            mu = mu.clamp_min(torch.finfo(z.dtype).tiny)
            nu = torch.where(ok, 2.0, 2 * nu)
            z_new, r_new = masked(ok, z_try, z), masked(ok, r_try, rz)
            if not tr.sync or bool((ok & tr.active).any()):
                r_new, J_new, g_new = linearize(r, z_new, m)
            else:
                J_new, g_new = J, g
            tiny_step = torch.linalg.vector_norm(h, dim=-1) <= eps * (
                torch.linalg.vector_norm(z, dim=-1) + eps)
            stalled = (~torch.isfinite(mu) | (nu > 2.0 ** 60) | tiny_step) & ~ok
            take = tr.advance(torch.linalg.vector_norm(g_new, dim=-1), stalled=stalled,
                              solved=small(r_new))
            z, rz = masked(take, z_new, z), masked(take, r_new, rz)
            J, g = masked(take, J_new, J), masked(take, g_new, g)
            A = J.transpose(-1, -2) @ J
        return tr.finish(z)

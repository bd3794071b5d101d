"""Broyden's ("good") quasi-Newton method for batched nonlinear systems ``F(z) = 0``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, check_output, masked
from ._steps import batched_jacobian, line_search, merit, solve_or_pinv

__all__ = ["Broyden"]

_INITS = ("identity", "jacobian")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(IterativeSolver):
    r"""Broyden's good method with a batched inverse-Jacobian estimate, for root problems.

    Each element keeps ``H_b ≈ (∂F_b/∂z_b)⁻¹`` of shape ``(n, n)`` and steps along
    ``d_b = -H_b F_b(z_b)``. After a step ``s = z⁺ - z`` with ``y = F(z⁺) - F(z)`` the
    inverse is updated by Sherman–Morrison (the "good" Broyden update of ``J``):

    .. math:: H⁺ = H + \frac{(s - H y)\, s^\top H}{s^\top H y}

    (skipped where ``|sᵀHy|`` is negligible). Safeguard: a derivative-free backtracking on
    ``φ = ½‖F‖²`` requires ``φ(z + t d) <= (1 - 2·10⁻⁴ t) φ(z)``; if no step is accepted,
    ``H`` is reset to its initial value and the element tries again; a failure right after a
    reset stops it with ``STAGNATION``.

    Initial inverse Jacobian: ``init="identity"`` uses ``H₀ = -init_scale · I``, i.e. the
    Jacobian ``-I/init_scale`` of fixed-point residuals ``F(z) = T(z) - z`` with a
    contractive ``T`` (the first step is then a damped Picard step); for general systems use
    ``init="jacobian"``, the exact ``(∂F/∂z)⁻¹`` at the start (and at each reset) from
    ``n`` vmapped JVPs.

    Residual: ``‖F(z)‖₂``; converged when it is ``<= atol + rtol · ‖F(z0)‖₂``. Convergence is
    locally superlinear.

    Attributes:
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 100).
        init: ``"jacobian"`` (default: one Jacobian at the start and at resets) or ``"identity"``.
        init_scale: ``H₀ = -init_scale · I`` for ``init="identity"`` (default 1.0).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``
            (one line-search trial per iteration, retried at the next if rejected).

    Example:
        >>> T = lambda z: 0.5 * torch.cos(z)
        >>> res = Broyden().run_root(lambda z: T(z) - z, torch.zeros(2, 3, dtype=torch.float64))
        >>> bool(res.converged.all())
        True

    References:
        C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations",
        Math. Comp. 19 (1965); Nocedal & Wright, *Numerical Optimization*, 2006, §11.1.
    """

    max_iter: int = 100
    init: str = "jacobian"
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in _INITS:
            raise ValueError(f"Broyden: init must be one of {_INITS}, got {self.init!r}")
        self._check("init_scale", float, low=0.0, strict=True)

    def _initial(self, F: Fn, z: torch.Tensor, sync: bool) -> torch.Tensor:
        B, n = z.shape
        eye = torch.eye(n, dtype=z.dtype, device=z.device).expand(B, n, n)
        if self.init == "identity":
            return -self.init_scale * eye
        J = batched_jacobian(F, z, n)
        return solve_or_pinv(J, eye, sync)

    def run_root(self, F: Fn, z0: torch.Tensor, *, callback: Callback | None = None) -> Result:
        """Solve ``F(z) = 0`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        z = check_iterate(z0)
        Fz = check_output(F(z), tuple(z.shape), "F")
        tr = self._tracker(torch.linalg.vector_norm(Fz, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1))
        H = H0 = self._initial(F, z, tr.sync)
        fresh, t_next = torch.ones_like(tr.active), torch.ones_like(tr.residual)
        evaluate = merit(F)
        for _ in tr:
            d = -(H @ Fz.unsqueeze(-1)).squeeze(-1)
            phi0 = 0.5 * (Fz * Fz).sum(-1)
            active = tr.active
            step = line_search(evaluate, z, d, phi0, -2 * phi0, (phi0, Fz), active, t0=t_next, sync=tr.sync)
            z_new, F_new, ok = step.z, step.values[1], step.ok
            exhausted = ~ok if tr.sync else ~ok & (step.t_retry < 2.0**-10)
            reset = active & exhausted & ~fresh
            take = tr.advance(torch.linalg.vector_norm(F_new, dim=-1), nonfinite=~torch.isfinite(z_new).all(-1),
                              stalled=exhausted & fresh if tr.sync else None)
            t_next = torch.where(ok | reset, 1.0, step.t_retry)
            # Sherman–Morrison update of the inverse Jacobian where a step was taken.
            s, y = z_new - z, F_new - Fz
            Hy = (H @ y.unsqueeze(-1)).squeeze(-1)
            sH = (s.unsqueeze(-2) @ H).squeeze(-2)
            denom = (s * Hy).sum(-1)
            scale = torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(Hy, dim=-1)
            upd = take & ok & (denom.abs() > 1e-12 * scale) & (scale > 0)
            safe = torch.where(upd, denom, torch.ones_like(denom))
            H_new = H + (s - Hy).unsqueeze(-1) * sH.unsqueeze(-2) / safe[:, None, None]
            H = masked(upd, H_new, H)
            if not tr.sync:  # no host sync: reset to the initial H₀ (not re-evaluated at z)
                H = masked(reset, H0, H)
            elif bool(reset.any()):
                H = masked(reset, self._initial(F, z, tr.sync), H)
            fresh = (fresh | reset) & ~upd
            z, Fz = masked(take, z_new, z), masked(take, F_new, Fz)
        return tr.finish(z)

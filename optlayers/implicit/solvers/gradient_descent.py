"""Gradient descent for batched smooth minimisation ``min_z f(z)``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, masked
from ._steps import batched_value_and_grad, line_search
from .proximal_gradient import FlatProx, ProximalGradient

__all__ = ["GradientDescent"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientDescent(IterativeSolver):
    r"""Gradient descent with a fixed step or per-element Armijo backtracking.

    Each element of ``f: (B, n) -> (B,)`` (independent problems; the per-element gradients
    are those of ``Σ_b f_b``) iterates

    .. math:: z_{k+1} = z_k - t_k ∇f(z_k)

    with ``t_k = step``, or, for ``step=None``, ``t_k`` from a backtracking line search (see
    :func:`line_search`) from the Barzilai–Borwein trial step ``sᵀs / sᵀy`` of the last step
    (1 at first) until the Armijo condition ``f(z_k - t ∇f) <= f(z_k) - 10⁻⁴ t ‖∇f(z_k)‖²``
    holds, so the objective decreases monotonically. An element whose backtracking fails
    stops with ``STAGNATION``. With ``prox`` given to :meth:`run_minimize`, the iteration is
    the (unaccelerated) proximal gradient method of :class:`ProximalGradient`.

    Residual: ``‖∇f(z)‖₂``; converged when it is ``<= atol + rtol · ‖∇f(z0)‖₂``. Convergence
    is linear for strongly convex ``f`` (rate ``1 - 1/κ``); prefer :class:`LBFGS` for
    ill-conditioned problems.

    Attributes:
        step: Fixed step size, or ``None`` (default) for backtracking.
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 1000).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``
            (one line-search trial per iteration, retried at the next if rejected).

    Example:
        >>> f = lambda z: ((z - 1.0) ** 2).sum(-1)
        >>> res = GradientDescent().run_minimize(f, torch.zeros(2, 3, dtype=torch.float64))
        >>> bool(res.converged.all())
        True

    References:
        Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §3.1–3.2; J. Barzilai &
        J. M. Borwein, "Two-point step size gradient methods", IMA J. Numer. Anal. 8, 1988.
    """

    step: float | None = None
    max_iter: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("step", float, low=0.0, strict=True, allow_none=True)

    def run_minimize(self, f: Fn, z0: torch.Tensor, *, prox: FlatProx | None = None,
                     callback: Callback | None = None) -> Result:
        """Minimise ``f`` (or ``f + g`` with ``prox`` the prox of ``g``) from ``z0`` (B, n)."""
        if prox is not None:
            pg = ProximalGradient(prox, step=self.step, acceleration=False, rtol=self.rtol,
                                  atol=self.atol, max_iter=self.max_iter,
                                  check_every=self.check_every)
            return pg.run_minimize(f, z0, prox=prox, callback=callback)
        z = check_iterate(z0)
        fz, g = batched_value_and_grad(f, z)
        tr = self._tracker(torch.linalg.vector_norm(g, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1) | ~torch.isfinite(fz))
        t = torch.ones_like(fz)
        big = torch.finfo(z.dtype).max ** 0.5

        def evaluate(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return batched_value_and_grad(f, w)

        for _ in tr:
            stalled = None
            if self.step is None:
                step = line_search(evaluate, z, -g, fz, -(g * g).sum(-1), (fz, g), tr.active, t0=t,
                                   has_grad=True, sync=tr.sync)
                z_new, (f_new, g_new) = step.z, step.values
                # Next first trial: the Barzilai–Borwein step sᵀs / sᵀy (2t where sᵀy <= 0).
                s, y = z_new - z, g_new - g
                sy, ss = (s * y).sum(-1), (s * s).sum(-1)
                bb = torch.where(sy > 0, ss / torch.where(sy > 0, sy, torch.ones_like(sy)), 2 * step.t)
                t = torch.where(step.ok, bb.nan_to_num(1.0).clamp(torch.finfo(z.dtype).tiny, big), step.t_retry)
                stalled = ~step.ok if tr.sync else None
            else:
                z_new = z - self.step * g
                f_new, g_new = batched_value_and_grad(f, z_new)
            take = tr.advance(torch.linalg.vector_norm(g_new, dim=-1), stalled=stalled,
                              nonfinite=~torch.isfinite(z_new).all(-1) | ~torch.isfinite(f_new))
            z, fz, g = masked(take, z_new, z), masked(take, f_new, fz), masked(take, g_new, g)
        return tr.finish(z)

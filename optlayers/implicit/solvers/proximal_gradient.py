"""Proximal and projected gradient (FISTA with restart) for ``min_z f(z) + g(z)``, batched."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, check_output, masked
from ._steps import MAX_TRIALS, batched_value_and_grad

__all__ = ["ProximalGradient", "ProjectedGradient", "FlatProx"]

FlatProx = Callable[[torch.Tensor, Any], torch.Tensor]
"""``prox(z (B, n), step: float | Tensor (B, 1)) -> (B, n)``, the prox of ``step · g``."""


def _upper_bound_holds(fc: torch.Tensor, gc: torch.Tensor, fy: torch.Tensor, gy: torch.Tensor,
                       diff: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """The backtracking test ``f(z⁺) <= f(y) + ∇f(y)·Δ + ‖Δ‖²/(2η)`` (``Δ = z⁺ - y``).

    Where ``f`` cannot resolve the terms (``‖Δ‖²/(2η)`` below 1000ε|f(y)|), the equivalent
    local-Lipschitz test ``(∇f(z⁺) - ∇f(y))·Δ <= ‖Δ‖²/η`` on the gradients is used.
    """
    slack = 10 * torch.finfo(fy.dtype).eps * fy.abs()
    quad = (diff * diff).sum(-1) / (2 * eta)
    by_value = fc <= fy + (gy * diff).sum(-1) + quad + slack
    by_grad = ((gc - gy) * diff).sum(-1) <= 2 * quad
    return torch.isfinite(fc) & torch.where(quad <= 100 * slack, by_grad, by_value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ProxGradBase(IterativeSolver):
    step: float | None = None
    acceleration: bool = True
    max_iter: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("step", float, low=0.0, strict=True, allow_none=True)
        self._check("acceleration", bool)

    def _default_prox(self) -> FlatProx:
        raise NotImplementedError

    def run_minimize(self, f: Fn, z0: torch.Tensor, *, prox: FlatProx | None = None,
                     callback: Callback | None = None) -> Result:
        """Minimise ``f + g`` from ``z0`` (B, n) with ``prox`` the flat prox of ``g``.

        ``prox`` defaults to the config's own callable applied to the flat ``(B, n)`` iterate.
        """
        prox = self._default_prox() if prox is None else prox
        z = check_iterate(z0)
        fz, gz = batched_value_and_grad(f, z)
        eta = torch.full_like(fz, 1.0 if self.step is None else self.step)

        def mapping(w: torch.Tensor, gw: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
            """The gradient-mapping norm ``‖w - prox(w - η∇f(w), η)‖ / η``."""
            p = check_output(prox(w - eta[:, None] * gw, eta[:, None]), tuple(w.shape), "prox")
            return torch.linalg.vector_norm(w - p, dim=-1) / eta

        tr = self._tracker(mapping(z, gz, eta), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1) | ~torch.isfinite(fz))
        y, fy, gy, mom = z, fz, gz, torch.ones_like(fz)
        backtrack = self.step is None
        for _ in tr:
            searching = tr.active.clone()
            zp, fp, gp = z, fz, gz
            for _ in range(MAX_TRIALS if backtrack and tr.sync else 1):
                cand = prox(y - eta[:, None] * gy, eta[:, None])
                fc, gc = batched_value_and_grad(f, cand)
                good = _upper_bound_holds(fc, gc, fy, gy, cand - y, eta) if backtrack else searching
                accept = searching & good
                zp, fp, gp = masked(accept, cand, zp), masked(accept, fc, fp), masked(accept, gc, gp)
                searching = searching & ~accept
                eta = torch.where(searching, eta / 2, eta)
                if tr.sync and not bool(searching.any()):
                    break
            # With check_every=None a rejected trial is retried (η halved) at the next iteration.
            take = tr.advance(mapping(zp, gp, eta), stalled=searching if backtrack and tr.sync else None,
                              nonfinite=~torch.isfinite(zp).all(-1) | ~torch.isfinite(fp))
            take = take & ~searching
            if self.acceleration:
                # FISTA momentum with gradient-based adaptive restart (O'Donoghue & Candès).
                restart = ((y - zp) * (zp - z)).sum(-1) > 0
                mom_new = torch.where(restart, 1.0, (1 + torch.sqrt(1 + 4 * mom * mom)) / 2)
                beta = torch.where(restart, 0.0, (mom - 1) / mom_new)
                y_new = zp + beta.unsqueeze(-1) * (zp - z)
                if not tr.sync or bool((take & ~restart).any()):
                    fyn, gyn = batched_value_and_grad(f, y_new)
                else:
                    fyn, gyn = fp, gp
                fyn, gyn = torch.where(restart, fp, fyn), masked(restart, gp, gyn)
                mom = torch.where(take, mom_new, mom)
            else:
                y_new, fyn, gyn = zp, fp, gp
            y, fy, gy = masked(take, y_new, y), masked(take, fyn, fy), masked(take, gyn, gy)
            z, fz, gz = masked(take, zp, z), masked(take, fp, fz), masked(take, gp, gz)
        return tr.finish(z)


@dataclasses.dataclass(frozen=True)
class ProximalGradient(_ProxGradBase):
    r"""Proximal gradient / FISTA with backtracking and adaptive restart, batched.

    Minimises ``f(z) + g(z)`` per element, with ``f: (B, n) -> (B,)`` smooth and ``g`` given
    by its proximal operator ``prox(v, η) = argmin_u g(u) + ‖u - v‖²/(2η)``:

    .. math:: z_{k+1} = \mathrm{prox}(y_k - η_k ∇f(y_k), η_k),\qquad
              y_{k+1} = z_{k+1} + \frac{θ_k - 1}{θ_{k+1}}(z_{k+1} - z_k),\quad
              θ_{k+1} = \tfrac{1 + \sqrt{1 + 4θ_k^2}}{2}

    (``y = z`` without acceleration). ``η_k = step``, or for ``step=None`` backtracking
    (halving, non-increasing, from 1) until the quadratic upper bound
    ``f(z⁺) <= f(y) + ∇f(y)·(z⁺ - y) + ‖z⁺ - y‖²/(2η)`` holds. Momentum restarts
    (``θ = 1``, ``y = z⁺``) when ``(y - z⁺)·(z⁺ - z) > 0``, which restores linear
    convergence on strongly convex problems.

    Residual (optimality condition ``z = prox(z - η∇f(z), η)``): the gradient mapping
    ``‖z - prox(z - η∇f(z), η)‖₂ / η`` at the returned ``z``; converged when it is
    ``<= atol + rtol · (its value at z0)``.

    Attributes:
        prox: The user's proximal operator ``prox(v, η)`` (positional); the front-ends pass a
            flattened version to :meth:`run_minimize`.
        step: Fixed step ``η``, or ``None`` (default) for backtracking.
        acceleration: FISTA momentum with restart (default True).
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 1000).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``
            (one backtracking trial per iteration, a rejected one retried at the next).

    Example:
        >>> soft = lambda v, eta: torch.sign(v) * (v.abs() - 0.1 * eta).clamp_min(0)
        >>> f = lambda z: 0.5 * ((z - 1.0) ** 2).sum(-1)
        >>> res = ProximalGradient(soft).run_minimize(f, torch.zeros(2, 3, dtype=torch.float64))
        >>> round(float(res.solution[0, 0]), 6)
        0.9

    References:
        A. Beck & M. Teboulle, "A fast iterative shrinkage-thresholding algorithm for linear
        inverse problems", SIAM J. Imaging Sci. 2(1), 2009; B. O'Donoghue & E. Candès,
        "Adaptive restart for accelerated gradient schemes", Found. Comput. Math. 15, 2015.
    """

    prox: FlatProx
    _: dataclasses.KW_ONLY

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.prox):
            raise ValueError(f"ProximalGradient: prox must be callable, got {self.prox!r}")

    def _default_prox(self) -> FlatProx:
        return self.prox


@dataclasses.dataclass(frozen=True)
class ProjectedGradient(_ProxGradBase):
    r"""Projected gradient / accelerated projected gradient onto a convex set ``C``, batched.

    The special case of :class:`ProximalGradient` with ``g`` the indicator of ``C``: the prox
    is the Euclidean projection, which ignores the step,

    .. math:: z_{k+1} = Π_C(y_k - η_k ∇f(y_k)).

    Residual: ``‖z - Π_C(z - η∇f(z))‖₂ / η``; converged when it is
    ``<= atol + rtol · (its value at z0)``.

    Attributes:
        projection: The user's projection ``Π_C(v)`` (positional); the front-ends pass a
            flattened ``prox(v, η) = Π_C(v)`` to :meth:`run_minimize`.
        step, acceleration, rtol, atol, max_iter, check_every: As in :class:`ProximalGradient`.

    Example:
        >>> box = lambda v: v.clamp(0.0, 0.5)
        >>> f = lambda z: 0.5 * ((z - 1.0) ** 2).sum(-1)
        >>> res = ProjectedGradient(box).run_minimize(f, torch.zeros(2, 3, dtype=torch.float64))
        >>> float(res.solution.max())
        0.5

    References:
        A. Beck & M. Teboulle (2009); Nocedal & Wright, *Numerical Optimization*, 2006, §16.7.
    """

    projection: Callable[[torch.Tensor], torch.Tensor]
    _: dataclasses.KW_ONLY

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.projection):
            raise ValueError(f"ProjectedGradient: projection must be callable, "
                             f"got {self.projection!r}")

    def _default_prox(self) -> FlatProx:
        projection = self.projection
        return lambda v, step: projection(v)

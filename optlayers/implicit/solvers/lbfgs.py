"""Limited-memory BFGS for batched smooth minimisation ``min_z f(z)``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, masked
from ._steps import batched_value_and_grad, line_search

__all__ = ["LBFGS"]

_LINE_SEARCHES = ("wolfe", "armijo")


def _two_loop(g: torch.Tensor, S: list[torch.Tensor], Y: list[torch.Tensor],
              R: list[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:
    """``H g`` by the two-loop recursion; pairs with ``ρ = 0`` are no-ops (skipped updates)."""
    q, alphas = g, []
    for s, y, rho in zip(reversed(S), reversed(Y), reversed(R), strict=True):
        a = rho * (s * q).sum(-1)
        q = q - a.unsqueeze(-1) * y
        alphas.append(a)
    r = gamma.unsqueeze(-1) * q
    for s, y, rho, a in zip(S, Y, R, reversed(alphas), strict=True):
        b = rho * (y * r).sum(-1)
        r = r + (a - b).unsqueeze(-1) * s
    return r


@dataclasses.dataclass(frozen=True, kw_only=True)
class LBFGS(IterativeSolver):
    r"""L-BFGS with per-element history and line search, for a batch of smooth problems.

    Each element of ``f: (B, n) -> (B,)`` steps along ``d = -H_k ∇f(z_k)``, where ``H_k`` is
    the L-BFGS inverse-Hessian estimate from the last ``memory`` pairs
    ``s_i = z_{i+1} - z_i``, ``y_i = ∇f(z_{i+1}) - ∇f(z_i)`` (two-loop recursion, initial
    scaling ``H⁰ = (sᵀy / yᵀy) I`` from the newest pair), with ``t`` from a line search:
    ``"wolfe"`` (default) finds a weak-Wolfe point by bisection/expansion (Armijo
    ``c₁ = 1e-4``, curvature ``c₂ = 0.9``), ``"armijo"`` backtracks. A pair failing the
    curvature condition ``sᵀy > 0`` is skipped (stored with ``ρ = 0``), so an element without
    a valid pair takes a steepest-descent step (first step ``t₀ = 1/‖∇f‖``); a direction that
    is not a descent direction is replaced by ``-∇f``. Where the line search fails, the
    element's history is cleared and it retries with steepest descent; a failure of that
    stops it with ``STAGNATION``.

    Residual: ``‖∇f(z)‖₂``; converged when it is ``<= atol + rtol · ‖∇f(z0)‖₂``.

    Attributes:
        memory: Number of stored pairs (default 10).
        line_search: ``"wolfe"`` (default) or ``"armijo"``.
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 500).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``
            (one line-search trial per iteration, retried at the next if rejected).

    Example:
        >>> f = lambda z: (100 * (z[:, 1] - z[:, 0] ** 2) ** 2 + (1 - z[:, 0]) ** 2)
        >>> res = LBFGS().run_minimize(f, torch.zeros(3, 2, dtype=torch.float64))
        >>> bool(res.converged.all())
        True

    References:
        Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, §7.2 (Algorithm 7.4);
        A. S. Lewis & M. L. Overton, "Nonsmooth optimization via quasi-Newton methods",
        Math. Program. 141, 2013 (the bisection weak-Wolfe line search).
    """

    memory: int = 10
    line_search: str = "wolfe"
    max_iter: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("memory", int, low=1)
        if self.line_search not in _LINE_SEARCHES:
            raise ValueError(f"LBFGS: line_search must be one of {_LINE_SEARCHES}, "
                             f"got {self.line_search!r}")

    def run_minimize(self, f: Fn, z0: torch.Tensor, *, prox: object = None,
                     callback: Callback | None = None) -> Result:
        """Minimise ``f`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        if prox is not None:
            raise ValueError("LBFGS handles smooth problems only (prox must be None); "
                             "use ProximalGradient or ProjectedGradient")
        z = check_iterate(z0)
        fz, g = batched_value_and_grad(f, z)
        tr = self._tracker(torch.linalg.vector_norm(g, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1) | ~torch.isfinite(fz))
        S: list[torch.Tensor] = []
        Y: list[torch.Tensor] = []
        R: list[torch.Tensor] = []
        gamma = torch.ones_like(fz)
        has_pair, retry = torch.zeros_like(tr.active), torch.zeros_like(tr.active)
        t_retry = torch.ones_like(fz)
        tiny = torch.finfo(z.dtype).tiny

        def evaluate(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return batched_value_and_grad(f, w)

        for _ in tr:
            d = -_two_loop(g, S, Y, R, gamma)
            slope = (g * d).sum(-1)
            descent = torch.isfinite(slope) & (slope < 0)
            d = masked(descent, d, -g)
            gg = (g * g).sum(-1)
            slope = torch.where(descent, slope, -gg)
            t0 = torch.where(has_pair, 1.0, 1.0 / gg.sqrt().clamp_min(tiny)).clamp_max(1.0)
            step = line_search(evaluate, z, d, fz, slope, (fz, g), tr.active, t0=torch.where(retry, t_retry, t0),
                               wolfe=self.line_search == "wolfe", has_grad=True, sync=tr.sync)
            z_new, (f_new, g_new), ok = step.z, step.values, step.ok
            # Exhausted line search: clear the history (retry with steepest descent), or stop.
            exhausted = ~ok if tr.sync else ~ok & (step.t_retry < 2.0**-10)
            take = tr.advance(torch.linalg.vector_norm(g_new, dim=-1),
                              stalled=exhausted & ~has_pair if tr.sync else None,
                              nonfinite=~torch.isfinite(z_new).all(-1) | ~torch.isfinite(f_new))
            reset = tr.active & exhausted & has_pair
            retry, t_retry = ~ok & ~reset, step.t_retry
            s, y = z_new - z, g_new - g
            sy, yy = (s * y).sum(-1), (y * y).sum(-1)
            eps = torch.finfo(z.dtype).eps
            valid = take & ok & (sy > eps * torch.linalg.vector_norm(s, dim=-1)
                                 * torch.linalg.vector_norm(y, dim=-1)) & (yy > 0)
            safe_sy = torch.where(valid, sy, torch.ones_like(sy))
            R = [torch.where(reset, 0.0, rho) for rho in R]
            S.append(masked(valid, s, torch.zeros_like(s)))
            Y.append(masked(valid, y, torch.zeros_like(y)))
            R.append(torch.where(valid, 1.0 / safe_sy, torch.zeros_like(sy)))
            S, Y, R = S[-self.memory:], Y[-self.memory:], R[-self.memory:]
            gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
            gamma = torch.where(reset, 1.0, gamma)
            has_pair = (has_pair | valid) & ~reset
            z, fz, g = masked(take, z_new, z), masked(take, f_new, fz), masked(take, g_new, g)
        return tr.finish(z)

r"""Projected subgradient ascent on the Lagrangian dual, with ergodic primal recovery.

.. math::

    \lambda_{k+1} = \Pi\big(\lambda_k + \alpha_k s_k\big), \qquad s_k = g(x^\star(\lambda_k)),

with Polyak steps :math:`\alpha_k = \theta (q^\star - q(\lambda_k)) / \lVert s_k\rVert^2` when a
target :math:`q^\star` is known, or diminishing steps :math:`\alpha_k = \alpha_0/\sqrt{k+1}`.
The primal estimate is the ergodic average :math:`\bar x = \sum_k \alpha_k x_k / \sum_k \alpha_k`
(Larsson, Patriksson, Strömberg 1999), whose constraint violation tends to zero for convex
problems. Π projects inequality multipliers onto ``λ ≥ 0``.

Subgradient ascent has no optimality certificate: it reports success only when the Polyak
target is reached (``q* − q_best ≤ tol (1 + |q*|)``) or the projected step vanishes.

References:
    Polyak (1969). Minimization of unsmooth functionals.
    Larsson, Patriksson, Strömberg (1999). Ergodic, primal convergence in dual subgradient schemes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from torch import Tensor

from ..._result import Result, Status
from ._common import DualInfo, Oracle, combine_primal, info_from, make_result, project

__all__ = ["SubgradientAscent", "run_subgradient"]


@dataclasses.dataclass(frozen=True)
class SubgradientAscent:
    r"""Projected subgradient ascent configuration.

    .. math::

        \lambda_{k+1} = \Pi\big(\lambda_k + \alpha_k\, g(x^\star(\lambda_k))\big), \qquad
        \alpha_k = \theta\,\frac{q^\star - q(\lambda_k)}{\lVert g(x^\star(\lambda_k))\rVert^2}
        \ \text{(Polyak)} \quad\text{or}\quad \alpha_k = \frac{\alpha_0}{\sqrt{k+1}},

    with the ergodic primal average :math:`\bar x = \sum_k \alpha_k x_k / \sum_k \alpha_k`.

    Args:
        step: ``"polyak"`` (needs ``target``) or ``"diminishing"``.
        lr: ``α₀`` of the diminishing rule, or the Polyak relaxation θ ∈ (0, 2).
        target: Known (or estimated) optimal dual value ``q*`` for Polyak steps.
        max_iter: Number of oracle calls.
        tol: Tolerance of the (weak) stopping tests, see the module docstring.

    Example:
        Polyak steps with the known optimal value ``q* = ¼``:

        >>> import torch
        >>> from optlayers.solvers.dual import maximize_dual, SubgradientAscent
        >>> inner = lambda lam: lam.expand(2)          # argmin_x ½‖x‖² + λ(1 − x₁ − x₂) = (λ, λ)
        >>> f = lambda x: 0.5 * (x ** 2).sum()
        >>> g = lambda x: (1 - x.sum()).reshape(1)     # x₁ + x₂ ≥ 1;  q(λ) = λ − λ², max at λ = ½
        >>> lam0 = torch.zeros(1, dtype=torch.float64)
        >>> res = maximize_dual(inner, f, g, lam0, method=SubgradientAscent(step="polyak", target=0.25))
        >>> bool(res.converged), round(float(res.solution), 3), round(float(res.aux.value), 6)
        (True, 0.5, 0.25)
    """

    step: Literal["polyak", "diminishing"] = "diminishing"
    lr: float = 1.0
    target: float | None = None
    max_iter: int = 200
    tol: float = 1e-8

    def __post_init__(self) -> None:
        if self.step not in ("polyak", "diminishing"):
            raise ValueError(f"unknown step {self.step!r}; valid values: ['diminishing', 'polyak']")
        if self.step == "polyak" and self.target is None:
            raise ValueError("Polyak steps need target= (an estimate of the optimal dual value)")
        if not self.lr > 0 or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError("need lr > 0 and a positive int max_iter")


def run_subgradient(cfg: SubgradientAscent, oracle: Oracle, lam0: Tensor, eq: np.ndarray,
                    throw: bool) -> Result[DualInfo]:
    lam = project(lam0.detach().cpu().double().numpy(), eq, None)
    best_q, best_lam = -math.inf, lam.copy()
    points, weights = [], []
    converged, residual, k = False, math.inf, 0
    for k in range(cfg.max_iter):
        q, s, x = oracle(lam)
        if q > best_q:
            best_q, best_lam = q, lam.copy()
        nrm2 = float(s @ s)
        if cfg.step == "polyak":
            assert cfg.target is not None
            residual = (cfg.target - best_q) / (1 + abs(cfg.target))
            if residual <= cfg.tol:
                converged = True
                points.append(x)
                weights.append(1.0)
                break
            alpha = cfg.lr * (cfg.target - q) / max(nrm2, 1e-300)
        else:
            alpha = cfg.lr / math.sqrt(k + 1)
        points.append(x)
        weights.append(alpha)
        new = project(lam + alpha * s, eq, None)
        residual = float(np.linalg.norm(new - lam))
        if residual <= cfg.tol:
            converged = True
            break
        lam = new
    primal = combine_primal(points, np.asarray(weights))
    info = info_from(oracle, best_q, cfg.target if cfg.target is not None else math.inf, primal, oracle.constraints)
    status = int(Status.SUCCESS) if converged else int(Status.MAX_ITER)
    return make_result("maximize_dual(SubgradientAscent)", best_lam, lam0, converged, k + 1, residual, status, info,
                       throw, cfg.tol, cfg.max_iter)

r"""Proximal bundle method for the (nonsmooth, concave) Lagrangian dual.

With cuts :math:`q(\lambda) \le a_j + s_j^\top \lambda` (:math:`a_j = q_j - s_j^\top\lambda_j`) and
stability center :math:`\lambda_c`, each iteration solves

.. math::

    \hat\lambda = \arg\max_{\lambda \in \Lambda}\ m(\lambda) - \frac{1}{2t}\lVert\lambda - \lambda_c\rVert^2,
    \qquad m(\lambda) = \min_j a_j + s_j^\top\lambda,

through its dual over the simplex,
:math:`\min_{\alpha \in \Delta} a^\top\alpha + \max_{\lambda\in\Lambda} (S\alpha)^\top\lambda -
\lVert\lambda-\lambda_c\rVert^2/2t` with :math:`\hat\lambda = \Pi_\Lambda(\lambda_c + tS\alpha)`
(the small QP is solved by SciPy's SLSQP; its multipliers are the weights α). Then
one oracle call at :math:`\hat\lambda`: a *serious step* :math:`\lambda_c \leftarrow \hat\lambda`
if :math:`q(\hat\lambda) - q(\lambda_c) \ge m_L\,\delta` with the predicted increase
:math:`\delta = m(\hat\lambda) - q(\lambda_c)`, otherwise a *null step*; the cut is added either
way. Stop when :math:`\delta \le \text{tol}\,(1 + |q(\lambda_c)|)`. The primal estimate is
:math:`\sum_j \alpha_j x_j` (the subproblem's simplex weights).

References:
    Kiwiel (1990). Proximity control in bundle methods for convex nondifferentiable minimization.
    Lemaréchal (2001). Lagrangian relaxation. Computational Combinatorial Optimization.
    Sharma, Lau (2025). Cutting Slack: Quantum optimization with slack-free methods for
    combinatorial benchmarks. arXiv:2507.12159.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from torch import Tensor

from ..._result import Result, Status
from ._common import DualInfo, Oracle, combine_primal, info_from, make_result, project

__all__ = ["ProximalBundle", "run_bundle"]


@dataclasses.dataclass(frozen=True)
class ProximalBundle:
    r"""Proximal bundle configuration.

    Each iteration maximizes the cut model with a proximal term around the stability center,

    .. math::

        \hat\lambda = \arg\max_{\lambda \in \Lambda}\ \min_j \big(a_j + s_j^\top\lambda\big)
        - \frac{1}{2t}\lVert\lambda - \lambda_c\rVert^2,

    and moves the center to :math:`\hat\lambda` when the actual increase is at least
    :math:`m_L` times the predicted one (see the module docstring).

    Args:
        t: Proximal parameter (step scale) ``t > 0``.
        m_l: Serious-step fraction ``m_L ∈ (0, 1)``.
        max_iter: Number of oracle calls.
        tol: Relative predicted-increase tolerance.
        qp_max_iter: Iterations of the subproblem solver.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import maximize_dual, ProximalBundle
        >>> inner = lambda lam: lam.expand(2)          # argmin_x ½‖x‖² + λ(1 − x₁ − x₂) = (λ, λ)
        >>> f = lambda x: 0.5 * (x ** 2).sum()
        >>> g = lambda x: (1 - x.sum()).reshape(1)     # x₁ + x₂ ≥ 1;  q(λ) = λ − λ², max at λ = ½
        >>> lam0 = torch.zeros(1, dtype=torch.float64)
        >>> res = maximize_dual(inner, f, g, lam0, method=ProximalBundle(t=1.0))
        >>> bool(res.converged), round(float(res.solution), 6), [round(v, 6) for v in res.aux.primal.tolist()]
        (True, 0.5, [0.5, 0.5])
    """

    t: float = 1.0
    m_l: float = 0.1
    max_iter: int = 200
    tol: float = 1e-9
    qp_max_iter: int = 500

    def __post_init__(self) -> None:
        if not self.t > 0 or not 0 < self.m_l < 1 or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError("need t > 0, 0 < m_l < 1 and a positive int max_iter")


def _proj_simplex(v: np.ndarray) -> np.ndarray:
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, v.size + 1)
    cond = u - css / ind > 0
    r = ind[cond][-1]
    return np.maximum(v - css[r - 1] / r, 0.0)


def _subproblem(S: np.ndarray, a: np.ndarray, lam_c: np.ndarray, t: float, eq: np.ndarray,
                alpha0: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Solve the (λ, r) QP by SciPy's SLSQP (a dense active-set SQP, exact for a small convex QP).

    Returns ``(λ̂, α)`` with ``α`` the cut weights (the QP's multipliers, normalized onto the simplex).
    """
    from scipy.optimize import minimize

    m = lam_c.shape[0]
    lam0 = project(lam_c + t * (S.T @ alpha0), eq, None)
    z0 = np.append(lam0, float(np.min(a + S @ lam0)))

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        d = z[:m] - lam_c
        return float(-z[m] + float(d @ d) / (2 * t)), np.append(d / t, -1.0)

    cons = {"type": "ineq", "fun": lambda z: a + S @ z[:m] - z[m],
            "jac": lambda z: np.hstack([S, -np.ones((S.shape[0], 1))])}
    bounds = [(None, None) if e else (0.0, None) for e in eq] + [(None, None)]
    res = minimize(fun, z0, jac=True, method="SLSQP", constraints=[cons], bounds=bounds,
                   options={"ftol": 1e-15, "maxiter": max_iter})
    lam = project(res.x[:m], eq, None)
    raw = getattr(res, "multipliers", None)  # SciPy >= 1.15: constraint multipliers first
    mult = np.asarray(raw, dtype=float).reshape(-1)[: S.shape[0]] if raw is not None else alpha0
    if mult.shape[0] != S.shape[0] or not np.all(np.isfinite(mult)):
        mult = alpha0
    mult = np.maximum(mult, 0.0)
    alpha = mult / mult.sum() if mult.sum() > 0 else np.full(S.shape[0], 1.0 / S.shape[0])
    return lam, alpha


def run_bundle(cfg: ProximalBundle, oracle: Oracle, lam0: Tensor, eq: np.ndarray, throw: bool) -> Result[DualInfo]:
    lam_c = project(lam0.detach().cpu().double().numpy(), eq, None)
    q_c, s, x = oracle(lam_c)
    S, a, pts = [s], [q_c - s @ lam_c], [x]
    alpha = np.ones(1)
    delta, _k, converged, upper = math.inf, 0, False, math.inf
    for _k in range(1, cfg.max_iter):
        Sm, am = np.asarray(S), np.asarray(a)
        lam_hat, alpha = _subproblem(Sm, am, lam_c, cfg.t, eq, alpha, cfg.qp_max_iter)
        model = float(np.min(am + Sm @ lam_hat))
        upper = model
        delta = model - q_c
        if delta <= cfg.tol * (1 + abs(q_c)):
            converged = True
            break
        q, s, x = oracle(lam_hat)
        if q - q_c >= cfg.m_l * delta:
            lam_c, q_c = lam_hat, q
        S.append(s)
        a.append(q - s @ lam_hat)
        pts.append(x)
        alpha = np.append(alpha, 0.0)
    primal = combine_primal(pts, alpha[: len(pts)])
    info = info_from(oracle, q_c, upper, primal, oracle.constraints)
    status = int(Status.SUCCESS) if converged else int(Status.MAX_ITER)
    return make_result("maximize_dual(ProximalBundle)", lam_c, lam0, converged, oracle.calls,
                       delta / (1 + abs(q_c)), status, info, throw, cfg.tol, cfg.max_iter)

r"""Kelley's cutting-plane method on the Lagrangian dual.

Each oracle call at :math:`\lambda_j` gives the cut :math:`q(\lambda) \le q_j + s_j^\top(\lambda -
\lambda_j)`; the next point maximizes the cut model over a box,

.. math::

    \lambda_{k+1} \in \arg\max_{\lambda \in \Lambda,\ |\lambda| \le B}\ \min_{j \le k}
    q_j + s_j^\top(\lambda - \lambda_j),

a small LP (solved by HiGHS through SciPy). The model value is an upper bound on
:math:`\max q`, so ``upper − best ≤ tol (1 + |best|)`` certifies optimality.

References:
    Kelley (1960). The cutting-plane method for solving convex programs. J. SIAM.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from torch import Tensor

from ..._result import Result, Status
from ._common import DualInfo, Oracle, info_from, make_result, project

__all__ = ["CuttingPlane", "run_cutting_plane"]


@dataclasses.dataclass(frozen=True)
class CuttingPlane:
    r"""Kelley cutting planes.

    .. math::

        \lambda_{k+1} \in \arg\max_{\lambda \in \Lambda,\ |\lambda| \le B}\ \min_{j \le k}
        q_j + s_j^\top(\lambda - \lambda_j),

    stopping when the model's maximum (an upper bound on :math:`\max q`) is within
    ``tol (1 + |best|)`` of the best value found. No primal point is recovered.

    Args:
        box: Bound ``B`` on ``|λ|`` keeping the master LP bounded (must contain the optimum).
        max_iter: Number of oracle calls.
        tol: Relative gap between the model bound and the best value that stops the method.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import maximize_dual, CuttingPlane
        >>> inner = lambda lam: lam.expand(2)          # argmin_x ½‖x‖² + λ(1 − x₁ − x₂) = (λ, λ)
        >>> f = lambda x: 0.5 * (x ** 2).sum()
        >>> g = lambda x: (1 - x.sum()).reshape(1)     # x₁ + x₂ ≥ 1;  q(λ) = λ − λ², max at λ = ½
        >>> lam0 = torch.zeros(1, dtype=torch.float64)
        >>> res = maximize_dual(inner, f, g, lam0, method=CuttingPlane(box=10.0))
        >>> bool(res.converged), round(float(res.solution), 3)
        (True, 0.5)
        >>> round(float(res.aux.upper_bound - res.aux.value), 6)  # certified gap
        0.0
    """

    box: float = 1e3
    max_iter: int = 200
    tol: float = 1e-8

    def __post_init__(self) -> None:
        if not self.box > 0 or not isinstance(self.max_iter, int) or self.max_iter < 1 or self.tol < 0:
            raise ValueError("need box > 0, a positive int max_iter and tol >= 0")


def run_cutting_plane(cfg: CuttingPlane, oracle: Oracle, lam0: Tensor, eq: np.ndarray,
                      throw: bool) -> Result[DualInfo]:
    from scipy.optimize import linprog as highs

    m = eq.shape[0]
    lam = project(lam0.detach().cpu().double().numpy(), eq, cfg.box)
    S, a = [], []
    best_q, best_lam, upper, gap, k = -math.inf, lam.copy(), math.inf, math.inf, 0
    bounds = [(-cfg.box, cfg.box) if e else (0.0, cfg.box) for e in eq] + [(None, None)]
    converged = False
    for k in range(cfg.max_iter):  # noqa: B007 (k is reported)
        q, s, _ = oracle(lam)
        if q > best_q:
            best_q, best_lam = q, lam.copy()
        S.append(s)
        a.append(q - s @ lam)
        # max t  s.t.  t − s_jᵀλ ≤ a_j
        A = np.hstack([-np.asarray(S), np.ones((len(S), 1))])
        c = np.zeros(m + 1)
        c[-1] = -1.0
        sol = highs(c, A_ub=A, b_ub=np.asarray(a), bounds=bounds, method="highs")
        if sol.status != 0:
            break
        upper = -sol.fun
        gap = (upper - best_q) / (1 + abs(best_q))
        if gap <= cfg.tol:
            converged = True
            break
        lam = sol.x[:m]
    info = info_from(oracle, best_q, upper, None, oracle.constraints)
    status = int(Status.SUCCESS) if converged else int(Status.MAX_ITER)
    return make_result("maximize_dual(CuttingPlane)", best_lam, lam0, converged, k + 1, gap, status, info,
                       throw, cfg.tol, cfg.max_iter)

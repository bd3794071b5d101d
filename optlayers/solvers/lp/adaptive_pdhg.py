r"""Prediction–correction PDHG with average-spectrum step sizes (Xu & He, 2026).

Same problem and saddle point as :mod:`~optlayers.solvers.lp.pdhg`:
:math:`\min_{x \in X}\max_{y \in Y} \Phi(x, y) = c^\top x + \tfrac12 x^\top Q x - y^\top (K x - b)`
with :math:`X = [l, u]` and :math:`Y = \{y : y_I \ge 0\}`. Write :math:`w = (x, y)`,
:math:`r = 1/\tau`, :math:`s = 1/\sigma`.

**Prediction** (the Arrow–Hurwicz / original PDHG step, no extrapolation):

.. math::

    \tilde x = \Pi_X\!\Big(\frac{x^k - \tau (c - K^\top y^k)}{1 + \tau q}\Big), \qquad
    \tilde y = \Pi_Y\big(y^k + \sigma (b - K \tilde x)\big).

Its optimality conditions read :math:`\tilde w \in W`,
:math:`(w - \tilde w)^\top \{F(\tilde w) + Q_k(\tilde w - w^k)\} \ge 0` for all :math:`w \in W`, with
:math:`F(w) = (c + Qx - K^\top y,\; Kx - b)` and the *non-symmetric* matrix
:math:`Q_k = \begin{bmatrix} rI & K^\top \\ 0 & sI\end{bmatrix}`, which is why the plain
Arrow–Hurwicz iteration can diverge.

**Correction** with :math:`M_k = \begin{bmatrix} I & r^{-1}K^\top \\ 0 & I\end{bmatrix}` and relaxation
:math:`\alpha \in (0, 1]`:

.. math::

    w^{k+1} = w^k - \alpha M_k (w^k - \tilde w^k), \quad\text{i.e.}\quad
    x^{k+1} = x^k + \alpha(\tilde x - x^k) + \alpha\tau K^\top(\tilde y - y^k),\;
    y^{k+1} = y^k + \alpha(\tilde y - y^k).

Then :math:`H_k = Q_k M_k^{-1} = \operatorname{diag}(rI, sI) \succ 0` and
:math:`G_k = Q_k^\top + Q_k - \alpha M_k^\top H_k M_k \succeq \operatorname{diag}(rI,\, sI - r^{-1}KK^\top)`,
so :math:`\lVert w^{k+1} - w^*\rVert_{H}^2 \le \lVert w^k - w^*\rVert_{H}^2
- \alpha \lVert w^k - \tilde w^k\rVert_{G}^2` whenever the quadratic form of :math:`G_k` is positive
*along the step actually taken*:

.. math::

    \tau\sigma\,\lVert K^\top(\tilde y - y^k)\rVert^2 \;\le\; \nu\,\lVert \tilde y - y^k\rVert^2,
    \qquad 0 < \nu < 1.

Only a Rayleigh quotient of :math:`KK^\top` along the current dual move enters, not
:math:`\lVert K\rVert^2` (the Chambolle–Pock bound :math:`\tau\sigma\lVert K\rVert^2 < 1`). For a
direction spread over the spectrum that quotient is near the *average* eigenvalue
:math:`\lVert K\rVert_F^2/\min(m, n)`, so the initial step is
:math:`\tau\sigma = \nu\min(m,n)/\lVert \tilde K\rVert_F^2` and the step is then adapted: a step that
violates the test is rejected and retried with a smaller :math:`\eta = \sqrt{\tau\sigma}`, an accepted
one lets :math:`\eta` grow (PDLP's schedule
:math:`\eta' = \min((1 - k^{-0.3})\,\eta_{\max}, (1 + k^{-0.6})\,\eta)` with
:math:`\eta_{\max} = \sqrt{\nu}\lVert\Delta y\rVert/\lVert K^\top\Delta y\rVert`). ``step="constant"``
uses the full-spectrum step :math:`\tau\sigma\lVert\tilde K\rVert_2^2 = \nu` instead (never rejects).

The rest is shared with :class:`~optlayers.solvers.lp.PDHG`: Ruiz + Pock–Chambolle scaling,
``τ = η/ω``, ``σ = ηω`` with the primal weight ω, termination in original units on the
*predictions* :math:`\tilde w` (they lie in :math:`X \times Y`; the corrected :math:`x^{k+1}` need not),
KKT-potential restarts to the average or the last prediction (an addition to the paper's scheme,
which has none; ``restart="none"`` runs the plain method), infeasibility detection and
feasibility polishing. Three products with ``K`` per iteration (PDHG: two).

Reference:
    Xu, He (2026). Adaptive primal dual hybrid gradient algorithms based on average spectrum for
    saddle point problems. arXiv:2603.00644. (The paper's experiment is the assignment problem.)
    He, Yuan (2012). Convergence analysis of primal-dual algorithms for a saddle-point problem:
    from contraction perspective. SIAM J. Imaging Sci. (the prediction–correction framework).
"""

from __future__ import annotations

import dataclasses

from .pdhg import PDHG

__all__ = ["AdaptivePDHG"]


@dataclasses.dataclass(frozen=True)
class AdaptivePDHG(PDHG):
    """Prediction–correction PDHG with average-spectrum adaptive steps (module docstring).

    Accepts every :class:`PDHG` option (tolerances, ``max_iter``, ``check_every``, restarts,
    scaling, primal weight, polishing, infeasibility detection, with the same defaults; ``step``
    selects the adaptive average-spectrum rule or the constant full-spectrum step) plus:

    Args:
        nu: ν ∈ (0, 1) of the step test ``τσ‖Kᵀ(ỹ − y)‖² ≤ ν‖ỹ − y‖²`` (default 0.9).
        relaxation: α ∈ (0, 1] of the correction ``w ← w − αM(w − w̃)`` (default 1).

    Use it wherever a :class:`PDHG` config is accepted: ``linprog(..., solver=AdaptivePDHG())``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.lp import AdaptivePDHG, linprog
        >>> c = torch.tensor([-1.0, -2.0], dtype=torch.float64)
        >>> A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> res = linprog(c, A_ub=A, b_ub=torch.tensor([1.0], dtype=torch.float64), solver=AdaptivePDHG())
        >>> round(float(res.fun), 6)
        -2.0
    """

    nu: float = 0.9
    relaxation: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.nu, (int, float)) and 0.0 < self.nu < 1.0):
            raise ValueError(f"nu must be in (0, 1), got {self.nu!r}")
        if not (isinstance(self.relaxation, (int, float)) and 0.0 < self.relaxation <= 1.0):
            raise ValueError(f"relaxation must be in (0, 1], got {self.relaxation!r}")

    def _prediction_correction(self) -> tuple[float, float] | None:
        return (float(self.nu), float(self.relaxation))

r"""Smoothing of linear programs for useful gradients.

An LP :math:`x^\star(c) = \operatorname{argmin}_x c^\top x` s.t. :math:`Ax = b,\ Gx \le h` is
solved at a vertex of the feasible polytope, and the vertex does not move when ``c`` moves a
little: :math:`\partial x^\star / \partial c = 0` almost everywhere (and undefined where the
solution jumps). Differentiating the exact LP therefore gives no learning signal for ``c``
(cvxpylayers#127). The standard remedy, used here, is to differentiate a *smoothed* problem:

:class:`QuadraticSmoothing` (Wilder, Dilkina & Tambe, AAAI 2019; also Amos & Kolter's
OptNet-LP) solves the strictly convex QP

.. math::

    x_\varepsilon(c) = \operatorname*{argmin}_x\; c^\top x + \tfrac{\varepsilon}{2}\|x\|_2^2
    \quad\text{s.t.}\quad Ax = b,\; Gx \le h,

whose solution is unique, moves continuously with ``c`` (it is the Euclidean projection of
:math:`-c/\varepsilon` onto the polytope) and has the nonzero Jacobian of that projection.
Both the forward value and the gradient are those of the smoothed problem, so they are
consistent (gradcheck passes) and :math:`\|x_\varepsilon - x^\star\| = O(\varepsilon)` as
:math:`\varepsilon \to 0` (to the minimum-norm LP solution). Larger ``epsilon`` gives smoother,
more informative but more biased gradients. ``epsilon`` has the units of ``c / x``: scale it
with your costs.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["QuadraticSmoothing"]


@dataclasses.dataclass(frozen=True)
class QuadraticSmoothing:
    """Quadratic (Euclidean) regularization of an LP: add ``(epsilon/2) ‖x‖²`` to the objective.

    Args:
        epsilon: Regularization strength (``> 0``).

    Example:
        >>> from optlayers.solvers import QuadraticSmoothing
        >>> QuadraticSmoothing(0.1)
        QuadraticSmoothing(epsilon=0.1)
    """

    epsilon: float

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) \
                or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"QuadraticSmoothing: epsilon must be a finite float > 0, got {self.epsilon!r}")

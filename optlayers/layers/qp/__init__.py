"""Differentiable optimization layers over the batched QP solver.

* :func:`qp` / :class:`QPLayer` — OptNet-style QP layer with implicit KKT gradients.
* :func:`lp` / :class:`LPLayer` — LPs, with the documented smoothed gradient.
* :class:`CvxpyLayer` — drop-in for ``cvxpylayers.torch.CvxpyLayer``; QP/LP problems run on the
  batched solver, other cones delegate to cvxpylayers.
"""

from .cvxpy_layer import CvxpyLayer
from .lp_layer import LPLayer, lp
from .qp_layer import QPLayer, qp

__all__ = ["qp", "QPLayer", "lp", "LPLayer", "CvxpyLayer"]

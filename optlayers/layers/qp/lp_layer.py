r"""Differentiable LP layer: :func:`lp` and :class:`LPLayer` (an LP is the ``Q = 0`` QP).

The exact LP solution map is piecewise constant in the cost ``c`` (zero gradient almost
everywhere), so by default the layer solves and differentiates the quadratically smoothed LP of
:class:`~optlayers.solvers.QuadraticSmoothing`; pass ``smoothing=None`` for the exact LP (its
gradients with respect to ``h``, ``b``, ``G``, ``A`` are the vertex sensitivities, those with
respect to ``c`` are zero, and a degenerate vertex makes the adjoint system singular).
"""

from __future__ import annotations

import torch
from torch import nn

from ..._result import Result
from ...solvers.qp.interior_point import InteriorPoint, QPAux
from ...solvers.qp.lp import QuadraticSmoothing
from .qp_layer import qp

__all__ = ["lp", "LPLayer"]

_DEFAULT = QuadraticSmoothing(0.1)


def lp(c: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
       A: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
       smoothing: QuadraticSmoothing | None = _DEFAULT, solver: InteriorPoint | None = None,
       init: Result | torch.Tensor | None = None, throw: bool = True) -> Result[QPAux]:
    r"""Solve ``min cᵀx (+ ε/2 ‖x‖²) s.t. Ax = b, Gx ≤ h`` for a batch, differentiably.

    Args:
        c: ``(*bc, n)`` costs.
        G, h: ``(*bG, m, n)``, ``(*bh, m)`` or None.
        A, b: ``(*bA, k, n)``, ``(*bb, k)`` or None.
        smoothing: :class:`~optlayers.solvers.QuadraticSmoothing` (default ``epsilon=0.1``): the
            returned solution and its gradient are those of the smoothed problem. ``None`` solves
            the exact LP (gradient with respect to ``c`` zero almost everywhere).
        solver: :class:`~optlayers.solvers.InteriorPoint` configuration.
        init: Warm start (see :func:`~optlayers.layers.qp`).
        throw: Raise on infeasible/unbounded/unsolved elements (see :func:`~optlayers.layers.qp`).

    Returns:
        :class:`Result` with the solution ``x`` and :class:`QPAux` duals.

    Example:
        >>> import torch
        >>> from optlayers.layers import lp
        >>> c = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> G = -torch.eye(2, dtype=torch.float64); h = torch.zeros(2, dtype=torch.float64)
        >>> A = torch.ones(1, 2, dtype=torch.float64); b = torch.ones(1, dtype=torch.float64)
        >>> x = lp(c, G, h, A, b).solution   # close to the vertex (1, 0)
        >>> x.sum().backward()
    """
    if smoothing is not None and not isinstance(smoothing, QuadraticSmoothing):
        raise TypeError(f"smoothing must be a QuadraticSmoothing or None, got {type(smoothing).__name__}")
    n = c.shape[-1]
    eps = 0.0 if smoothing is None else smoothing.epsilon
    Q = eps * torch.eye(n, dtype=c.dtype, device=c.device)
    return qp(Q, c, G, h, A, b, solver=solver, init=init, throw=throw)


class LPLayer(nn.Module):
    r"""An LP as a network layer: ``forward(c, G, h, A, b) -> x`` (see :func:`lp`).

    .. math::

        x^\star = \operatorname*{argmin}_x c^\top x + \tfrac\varepsilon2\lVert x\rVert^2
        \quad\text{s.t.}\quad Ax = b,\; Gx \le h,

    with :math:`\varepsilon` the :class:`~optlayers.solvers.QuadraticSmoothing` (default 0.1; 0 for
    ``smoothing=None``, the exact LP), solved by the batched interior point and differentiated
    through its KKT conditions.

    Args:
        smoothing: The gradient smoothing in use (shown in ``repr``); None for the exact LP.
        solver: :class:`~optlayers.solvers.InteriorPoint` configuration.
        throw: Raise on failed elements.

    Example:
        On the simplex, the smoothed solution with costs ``(1, 2)`` is still the vertex ``(1, 0)``
        (the cost gap exceeds ε), and with costs ``(1, 1.05)`` it is interior:

        >>> import torch
        >>> from optlayers.layers import LPLayer
        >>> layer = LPLayer()
        >>> G = -torch.eye(2, dtype=torch.float64); h = torch.zeros(2, dtype=torch.float64)
        >>> A = torch.ones(1, 2, dtype=torch.float64); b = torch.ones(1, dtype=torch.float64)
        >>> c = torch.tensor([[1.0, 2.0], [1.0, 1.05]], dtype=torch.float64, requires_grad=True)
        >>> x = layer(c, G, h, A, b)
        >>> [[round(v, 6) for v in row] for row in x.tolist()]
        [[1.0, 0.0], [0.75, 0.25]]
        >>> x[1, 0].backward()
        >>> [round(v, 6) for v in c.grad[1].tolist()]  # ∂x₁/∂c = (−5, 5) on the interior piece
        [-5.0, 5.0]
    """

    def __init__(self, *, smoothing: QuadraticSmoothing | None = _DEFAULT, solver: InteriorPoint | None = None,
                 throw: bool = True) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.solver = solver if solver is not None else InteriorPoint()
        self.throw = throw

    def forward(self, c: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
                A: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.solve(c, G, h, A, b).solution

    def solve(self, c: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
              A: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
              init: Result | torch.Tensor | None = None) -> Result[QPAux]:
        """The full :class:`Result`."""
        return lp(c, G, h, A, b, smoothing=self.smoothing, solver=self.solver, init=init, throw=self.throw)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing!r}, throw={self.throw}"

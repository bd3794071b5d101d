"""The differentiable Sinkhorn front for networks: the functional :func:`sinkhorn` and a module.

:func:`sinkhorn` is the same function as :func:`optlayers.solvers.ot.sinkhorn` (the solver is
made differentiable where it is defined, in ``solvers/``; layers depend on solvers, never the
reverse). The gradient mode is a typed config: ``gradient=Envelope() | Implicit(linear_solver=...)
| Unroll()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..._result import Result
from ...solvers.ot import (
    AndersonAcceleration,
    Anneal,
    CostMatrix,
    Envelope,
    Implicit,
    PointCloud,
    SinkhornAux,
    Unroll,
    sinkhorn,
)
from ...solvers.ot.geometry import Cost
from ...solvers.ot.sinkhorn import Gradient

__all__ = ["sinkhorn", "Sinkhorn", "Envelope", "Implicit", "Unroll"]

_ENVELOPE = Envelope()


class Sinkhorn(nn.Module):
    """Entropic OT as a module: ``layer(x, y, a=None, b=None)`` returns ``OT_ε`` per problem.

    With ``y=None`` the first argument is a cost tensor ``(*batch, n, m)``. :meth:`solve` returns
    the full :class:`~optlayers.Result` (potentials, plan operator, flags). The value is

    .. math::
        \\mathrm{OT}_\\varepsilon(a, b) = \\min_{P \\ge 0,\\ P\\mathbf 1 = a,\\ P^\\top\\mathbf 1 = b}
            \\langle C, P\\rangle + \\varepsilon\\,\\mathrm{KL}(P \\,\\|\\, a \\otimes b)

    (KL-relaxed marginals with ``rho_a``/``rho_b``), with ``C_ij = c(x_i, y_j)``.

    Args:
        epsilon: Entropic regularization (absolute unless ``relative_epsilon``).
        cost: Ground cost for point clouds (``"sqeuclidean"`` default).
        relative_epsilon, rho_a, rho_b, tol, max_iter, anneal, acceleration, gradient, online,
        throw: As in :func:`sinkhorn`.

    Example:
        >>> import torch
        >>> from optlayers.layers.ot import Sinkhorn, Implicit
        >>> layer = Sinkhorn(epsilon=0.1, gradient=Implicit())
        >>> x = torch.rand(2, 8, 3, dtype=torch.float64, requires_grad=True)
        >>> out = layer(x, torch.rand(2, 6, 3, dtype=torch.float64))
        >>> out.shape
        torch.Size([2])
        >>> out.sum().backward()
        >>> x.grad.shape
        torch.Size([2, 8, 3])
    """

    def __init__(self, epsilon: float, *, cost: Cost | str | Callable[..., torch.Tensor] = "sqeuclidean",
                 relative_epsilon: bool = False, rho_a: float | None = None, rho_b: float | None = None,
                 tol: float | None = None, max_iter: int = 10_000, anneal: Anneal | None = None,
                 acceleration: AndersonAcceleration | None = None,
                 gradient: Gradient | str = _ENVELOPE, online: bool | None = None,
                 throw: bool = True) -> None:
        super().__init__()
        self.epsilon, self.cost, self.relative_epsilon = epsilon, cost, relative_epsilon
        self.rho_a, self.rho_b, self.tol, self.max_iter = rho_a, rho_b, tol, max_iter
        self.anneal, self.acceleration, self.gradient = anneal, acceleration, gradient
        self.online, self.throw = online, throw

    def solve(self, x: torch.Tensor, y: torch.Tensor | None = None, a: torch.Tensor | None = None,
              b: torch.Tensor | None = None) -> Result[SinkhornAux]:
        """The full :class:`~optlayers.Result` of :func:`sinkhorn`."""
        geom = CostMatrix(x) if y is None else PointCloud(x, y, self.cost, online=self.online)
        return sinkhorn(a, b, geom, epsilon=self.epsilon, relative_epsilon=self.relative_epsilon,
                        rho_a=self.rho_a, rho_b=self.rho_b, tol=self.tol, max_iter=self.max_iter,
                        anneal=self.anneal, acceleration=self.acceleration, gradient=self.gradient,
                        throw=self.throw)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, a: torch.Tensor | None = None,
                b: torch.Tensor | None = None) -> torch.Tensor:
        return self.solve(x, y, a, b).aux.value

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, gradient={self.gradient}"

"""Optimal transport solvers: Sinkhorn (balanced, unbalanced, annealed, batched), exact and sliced.

Public names:

* :func:`sinkhorn` — log-domain Sinkhorn returning a :class:`~optlayers.Result` whose
  ``solution`` is the potentials ``(f, g)`` and whose ``aux`` holds the plan operator, the value
  and the transport cost; gradients chosen by ``gradient=Envelope() | Implicit() | Unroll()``.
* Geometries: :class:`CostMatrix`, :class:`PointCloud` with :class:`SqEuclidean`,
  :class:`PNorm` or :class:`CustomCost` costs (online, block by block, above a size threshold).
* :class:`TransportPlan` — ``matvec``, ``rmatvec``, ``.T``, ``to_dense``, ``topk``.
* Options: :class:`Anneal`, :class:`AndersonAcceleration`.
* Exact / sliced: :func:`wasserstein_1d`, :func:`sliced_wasserstein`,
  :func:`max_sliced_wasserstein`, :func:`emd`.
"""

from ._iterations import AndersonAcceleration, Anneal
from .exact import emd, max_sliced_wasserstein, sliced_wasserstein, wasserstein_1d
from .geometry import CostMatrix, CustomCost, Geometry, PNorm, PointCloud, SqEuclidean
from .plan import TransportPlan
from .sinkhorn import Envelope, Implicit, SinkhornAux, Unroll, sinkhorn

__all__ = [
    "sinkhorn", "Envelope", "Implicit", "Unroll", "SinkhornAux",
    "Geometry", "CostMatrix", "PointCloud", "SqEuclidean", "PNorm", "CustomCost",
    "TransportPlan", "Anneal", "AndersonAcceleration",
    "wasserstein_1d", "sliced_wasserstein", "max_sliced_wasserstein", "emd",
]

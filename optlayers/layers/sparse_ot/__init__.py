"""Sparse optimal-transport layers: :class:`SparseOTRouter` for mixture-of-experts routing.

* :func:`sparse_ot_route` — functional routing by sparsity-constrained OT, returning a
  :class:`~optlayers.Result` with ``(dispatch, combine)`` and :class:`RoutingAux`.
* :class:`SparseOTRouter` — the module (a linear gate followed by :func:`sparse_ot_route`).
* :func:`topk_gating` — the top-``k`` softmax gating baseline in the same layout.
"""

from .router import RoutingAux, SparseOTRouter, sparse_ot_route, topk_gating

__all__ = ["SparseOTRouter", "sparse_ot_route", "topk_gating", "RoutingAux"]

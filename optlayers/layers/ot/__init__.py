"""Optimal-transport layers: the differentiable :func:`sinkhorn`, :class:`Sinkhorn`,
:func:`sinkhorn_divergence` and :class:`SinkhornLoss` (GeomLoss-compatible)."""

from .divergence import SinkhornLoss, sinkhorn_divergence
from .sinkhorn_layer import Envelope, Implicit, Sinkhorn, Unroll, sinkhorn

__all__ = ["sinkhorn", "Sinkhorn", "Envelope", "Implicit", "Unroll", "sinkhorn_divergence", "SinkhornLoss"]

"""Batched dense QP/LP solvers: :class:`InteriorPoint`, :func:`solve_qp`, LP smoothing configs."""

from .interior_point import InteriorPoint, QPAux, solve_qp

__all__ = ["InteriorPoint", "QPAux", "solve_qp"]

"""Dual methods for ``q(λ) = min_x f(x) + λᵀg(x)`` with any inner solver, and a batch dual-ascent helper."""

from ._common import DualInfo, maximize_dual
from .bundle import ProximalBundle
from .cutting_plane import CuttingPlane
from .grpo import GroupDualAscent, constrained_group_advantages, group_normalize
from .subgradient import SubgradientAscent

__all__ = ["maximize_dual", "DualInfo", "SubgradientAscent", "CuttingPlane", "ProximalBundle",
           "GroupDualAscent", "constrained_group_advantages", "group_normalize"]

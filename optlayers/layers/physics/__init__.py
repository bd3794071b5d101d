"""Physics-informed hard constraints and their mixture of experts (Chalapathi, Du & Krishnapriyan,
ICLR 2024): ``HardConstraintLayer`` (one constrained least-squares fit of a learned basis),
``PhysicsConstrainedMoE`` (one per tile of the domain, batched or expert-parallel over
``torch.distributed``), the tiling router and the soft-constraint (PINN) baseline loss."""

from ...solvers.pde.collocation import hard_constraint
from .hard_constraint import HardConstraintLayer, PhysicsReport

__all__ = ["HardConstraintLayer", "PhysicsReport", "hard_constraint"]

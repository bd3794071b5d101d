"""Physics-informed hard constraints and their mixture of experts (Chalapathi, Du & Krishnapriyan,
ICLR 2024): ``HardConstraintLayer`` (one constrained least-squares fit of a learned basis),
``PhysicsConstrainedMoE`` (one per tile of the domain, batched or expert-parallel over
``torch.distributed``), the ``TileRouter``, and the soft-constraint (PINN) baseline loss. The
solve itself (``hard_constraint``) lives in :mod:`optlayers.solvers.pde`."""

from ...solvers.pde import collocation as _collocation
from .baselines import PhysicsResiduals, physics_residuals, soft_constraint_loss
from .hard_constraint import HardConstraintLayer, PhysicsReport
from .moe import Interfaces, PhysicsConstrainedMoE, TileRouter, expert_blocks

# assigned after importing the submodule of the same name, so that the attribute is the function
hard_constraint = _collocation.hard_constraint

__all__ = [
    "HardConstraintLayer", "PhysicsConstrainedMoE", "TileRouter", "Interfaces", "PhysicsReport",
    "hard_constraint", "soft_constraint_loss", "physics_residuals", "PhysicsResiduals", "expert_blocks",
]

"""Constrained learning: constraints, formulations, multiplier updates and the primal–dual optimizer."""

from .constraint import (
    AugmentedLagrangian,
    Constraint,
    ConstraintState,
    Lagrangian,
    PenaltySchedule,
    QuadraticPenalty,
)
from .ddp import check_synchronized
from .multipliers import GradientAscent, NuPI
from .optimizer import ConstrainedOptimizer, ConstraintLog, StepInfo
from .problem import ConstrainedProblem, KKTResiduals, ProblemState, kkt_residuals

__all__ = [
    "Constraint", "ConstraintState", "Lagrangian", "AugmentedLagrangian", "QuadraticPenalty", "PenaltySchedule",
    "GradientAscent", "NuPI", "ConstrainedProblem", "ProblemState", "ConstrainedOptimizer", "StepInfo",
    "ConstraintLog", "KKTResiduals", "kkt_residuals", "check_synchronized",
]

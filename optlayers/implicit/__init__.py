"""optlayers.implicit — gradients of solutions by the implicit function theorem.

``custom_root``/``custom_fixed_point`` make any solver differentiable; ``root_solve``,
``fixed_point``, ``minimize`` and ``least_squares`` are generic batched solvers already wrapped;
the adjoint linear solvers are matrix-free and batched.
"""

from .adjoints import ImplicitAdjoint, OneStepAdjoint, UnrollAdjoint
from .custom_root import custom_fixed_point, custom_root
from .fixed_point import fixed_point
from .hyper_optimizer import HyperOptimizer
from .hypergradient import HypergradientInfo, PenaltyMethod, hypergradient
from .least_squares import least_squares
from .linear_solvers import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGStab,
    Dense,
    LinearOperator,
    LinearSolver,
    Neumann,
    NormalCG,
)
from .minimize import minimize
from .optimality import (
    kkt,
    mirror_descent_fp,
    projected_gradient_fp,
    proximal_gradient_fp,
    stationarity,
)
from .root_solve import root_solve
from .solvers import (
    LBFGS,
    Anderson,
    Broyden,
    GaussNewton,
    GradientDescent,
    LevenbergMarquardt,
    Newton,
    Picard,
    ProjectedGradient,
    ProximalGradient,
)

__all__ = [
    "custom_root", "custom_fixed_point", "root_solve", "fixed_point", "minimize", "least_squares",
    "ImplicitAdjoint", "UnrollAdjoint", "OneStepAdjoint",
    "CG", "MINRES", "GMRES", "BiCGStab", "NormalCG", "Neumann", "Dense", "Auto",
    "LinearOperator", "LinearSolver",
    "stationarity", "kkt", "projected_gradient_fp", "proximal_gradient_fp", "mirror_descent_fp",
    "Newton", "Broyden", "Picard", "Anderson", "GradientDescent", "LBFGS", "ProjectedGradient",
    "ProximalGradient", "GaussNewton", "LevenbergMarquardt",
    "hypergradient", "PenaltyMethod", "HypergradientInfo", "HyperOptimizer",
]

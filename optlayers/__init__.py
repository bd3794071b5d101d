"""optlayers — differentiable optimization for PyTorch.

Curated public API: explicit re-exports from :mod:`optlayers.implicit`,
:mod:`optlayers.solvers` and :mod:`optlayers.layers`.
"""

from ._result import AdjointSolveError, ConvergenceError, Result, Status
from .implicit import (
    CG,
    GMRES,
    LBFGS,
    MINRES,
    Anderson,
    Auto,
    BiCGStab,
    Broyden,
    Dense,
    GaussNewton,
    GradientDescent,
    HypergradientInfo,
    HyperOptimizer,
    ImplicitAdjoint,
    LevenbergMarquardt,
    LinearOperator,
    LinearSolver,
    Neumann,
    Newton,
    NormalCG,
    OneStepAdjoint,
    PenaltyMethod,
    Picard,
    ProjectedGradient,
    ProximalGradient,
    UnrollAdjoint,
    custom_fixed_point,
    custom_root,
    fixed_point,
    hypergradient,
    kkt,
    least_squares,
    minimize,
    mirror_descent_fp,
    projected_gradient_fp,
    proximal_gradient_fp,
    root_solve,
    stationarity,
)
from .layers import DEQ, DEQInfo, PhantomGradient
from .solvers import (
    project_box,
    project_halfspace,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_simplex,
    project_sparse_simplex,
    prox_elastic_net,
    prox_group_lasso,
    prox_l1,
    prox_l2,
)

__version__ = "0.1.0"

__all__ = [
    "Result", "Status", "ConvergenceError", "AdjointSolveError",
    "custom_root", "custom_fixed_point", "root_solve", "fixed_point", "minimize", "least_squares",
    "ImplicitAdjoint", "UnrollAdjoint", "OneStepAdjoint",
    "CG", "MINRES", "GMRES", "BiCGStab", "NormalCG", "Neumann", "Dense", "Auto",
    "LinearOperator", "LinearSolver",
    "stationarity", "kkt", "projected_gradient_fp", "proximal_gradient_fp", "mirror_descent_fp",
    "Newton", "Broyden", "Picard", "Anderson", "GradientDescent", "LBFGS", "ProjectedGradient",
    "ProximalGradient", "GaussNewton", "LevenbergMarquardt",
    "hypergradient", "PenaltyMethod", "HypergradientInfo", "HyperOptimizer", "DEQ", "DEQInfo", "PhantomGradient",
    "project_simplex", "project_sparse_simplex", "project_box", "project_l1_ball", "project_l2_ball",
    "project_linf_ball", "project_nonnegative", "project_halfspace",
    "prox_l1", "prox_l2", "prox_elastic_net", "prox_group_lasso",
]

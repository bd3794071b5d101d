"""optlayers.solvers — problem-specific solvers, each differentiable through optlayers.implicit."""

from .projections import (
    project_box,
    project_halfspace,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_simplex,
    project_sparse_simplex,
)
from .prox import prox_elastic_net, prox_group_lasso, prox_l1, prox_l2

__all__ = [
    "project_simplex", "project_sparse_simplex", "project_box", "project_l1_ball", "project_l2_ball",
    "project_linf_ball", "project_nonnegative", "project_halfspace",
    "prox_l1", "prox_l2", "prox_elastic_net", "prox_group_lasso",
]

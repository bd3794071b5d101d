"""1-D PDE building blocks for physics-informed layers: finite-difference derivatives on a
space–time grid, residuals of the heat, viscous Burgers and (PDEBench) diffusion–sorption
equations, small finite-difference reference solvers to measure errors, and the collocation
least-squares solve of a hard constraint (``hard_constraint``) with implicit gradients."""

from .collocation import (
    Collocation,
    ConstraintReport,
    ConstraintRows,
    collocation_residual,
    default_solver,
    gather_rows,
    hard_constraint,
    sample_collocation,
)
from .finite_difference import (
    Grid,
    basis_derivatives,
    diff1,
    diff2,
    point_derivatives,
    space_time_derivatives,
    stencils,
)
from .reference import (
    burgers_reference,
    diffusion_sorption_reference,
    heat_exact,
    reference_solution,
    relative_l2_error,
)
from .residuals import PDE1D, Burgers, DiffusionSorption, Fields, Heat, Partials, sample_coefficients

__all__ = [
    "Grid", "diff1", "diff2", "space_time_derivatives", "basis_derivatives", "point_derivatives", "stencils",
    "Fields", "Partials", "PDE1D", "Heat", "Burgers", "DiffusionSorption", "sample_coefficients",
    "heat_exact", "burgers_reference", "diffusion_sorption_reference", "reference_solution",
    "relative_l2_error",
    "Collocation", "ConstraintRows", "ConstraintReport", "sample_collocation", "gather_rows",
    "collocation_residual", "hard_constraint", "default_solver",
]

"""Generic batched iterative solvers driven by the implicit-differentiation front-ends.

Root finding (``run_root``): :class:`Newton`, :class:`Broyden`. Fixed points
(``run_fixed_point``): :class:`Picard`, :class:`Anderson`. Minimisation (``run_minimize``):
:class:`GradientDescent`, :class:`LBFGS`, :class:`ProximalGradient`,
:class:`ProjectedGradient`. Least squares (``run_least_squares``): :class:`GaussNewton`,
:class:`LevenbergMarquardt`. All act on flat batched iterates ``(B, n)`` with per-element
convergence and return a flat :class:`~optlayers.Result`.
"""

from ._base import Callback, IterativeSolver, Tracker, default_tol
from ._steps import batched_jacobian, batched_value_and_grad, line_search, solve_or_pinv
from .anderson import Anderson
from .broyden import Broyden
from .gauss_newton import GaussNewton
from .gradient_descent import GradientDescent
from .lbfgs import LBFGS
from .levenberg_marquardt import LevenbergMarquardt
from .newton import Newton
from .picard import Picard
from .proximal_gradient import FlatProx, ProjectedGradient, ProximalGradient

__all__ = [
    "Anderson", "Broyden", "Callback", "FlatProx", "GaussNewton", "GradientDescent",
    "IterativeSolver", "LBFGS", "LevenbergMarquardt", "Newton", "Picard", "ProjectedGradient",
    "ProximalGradient", "Tracker", "batched_jacobian", "batched_value_and_grad", "default_tol",
    "line_search", "solve_or_pinv",
]

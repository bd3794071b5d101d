"""Batched, matrix-free linear solvers for the adjoint systems of implicit differentiation.

Every solver is a frozen dataclass config; calling it as ``solver(op, b, x0=None)`` solves
``(A + ridge I) x = b`` for a batch of ``B`` independent systems (``b`` of shape ``(B, n)``,
``op`` a :class:`LinearOperator`) and returns a :class:`~optlayers.Result` with per-element
``converged``, ``iterations``, ``residual`` (relative: ``‖A x − b‖ / ‖b‖``) and ``status``.
The tolerance test is ``‖A x − b‖ ≤ max(atol, rtol ‖b‖)``, with ``rtol`` defaulting to 1e-12
in float64 and 1e-6 in float32.

========================  =========================================  ================
solver                    for                                        needs ``Aᵀ``
========================  =========================================  ================
:class:`CG`               symmetric positive definite                no
:class:`MINRES`           symmetric (indefinite)                     no
:class:`GMRES`            general                                    no
:class:`BiCGStab`         general                                    no
:class:`NormalCG`         general (least squares, squares κ)          yes (or symmetric)
:class:`Neumann`          ``ρ(I − αA) < 1`` (approximate by design)   no
:class:`Dense`            small ``n`` (LU / Cholesky / QR)            no
:class:`Auto`             picks one of the above from size and tags  no
========================  =========================================  ================

Example:
    >>> import torch
    >>> from optlayers.implicit.linear_solvers import LinearOperator, resolve_linear_solver
    >>> A = torch.tensor([[[4.0, 1.0], [1.0, 3.0]]], dtype=torch.float64)
    >>> op = LinearOperator.from_dense(A, positive_definite=True)
    >>> result = resolve_linear_solver("cg")(op, torch.ones(1, 2, dtype=torch.float64))
    >>> bool(result.converged.all())
    True
"""

from __future__ import annotations

from ._base import LinearOperator, LinearSolver
from .auto import Auto
from .bicgstab import BiCGStab
from .cg import CG
from .dense import Dense
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "Auto",
    "BiCGStab",
    "Dense",
    "LinearOperator",
    "LinearSolver",
    "Neumann",
    "NormalCG",
    "resolve_linear_solver",
]

_NAMES: dict[str, type[LinearSolver]] = {
    "auto": Auto,
    "bicgstab": BiCGStab,
    "cg": CG,
    "dense": Dense,
    "gmres": GMRES,
    "minres": MINRES,
    "neumann": Neumann,
    "normal_cg": NormalCG,
}


def resolve_linear_solver(solver: LinearSolver | str) -> LinearSolver:
    """Return ``solver`` itself, or the default config a name stands for.

    Args:
        solver: A :class:`LinearSolver` instance, or one of ``"auto"``, ``"bicgstab"``,
            ``"cg"``, ``"dense"``, ``"gmres"``, ``"minres"``, ``"neumann"``, ``"normal_cg"``
            (case-insensitive), which map to the class with its defaults.

    Raises:
        ValueError: Unknown name or wrong type; the message lists the valid names.

    Example:
        >>> resolve_linear_solver("GMRES")
        GMRES(rtol=None, atol=0.0, max_iter=None, ridge=0.0, callback=None, restart=20)
    """
    if isinstance(solver, LinearSolver):
        return solver
    if isinstance(solver, str):
        cls = _NAMES.get(solver.strip().lower())
        if cls is not None:
            return cls()
        raise ValueError(f"unknown linear solver {solver!r}; valid names: {sorted(_NAMES)}")
    raise ValueError(f"linear_solver must be a LinearSolver instance or a name; valid names: "
                     f"{sorted(_NAMES)}, got {solver!r}")

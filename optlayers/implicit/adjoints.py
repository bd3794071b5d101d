"""Gradient modes ("adjoints") for solutions of root and fixed-point problems.

* :class:`ImplicitAdjoint` — the implicit function theorem: with ``F(z*, θ) = 0``,
  ``∂z*/∂θ = −(∂_z F)⁻¹ ∂_θ F``. Reverse mode solves ``(∂_z F)ᵀ u = ḡ`` with a matrix-free
  linear solver and returns ``θ̄ = −(∂_θ F)ᵀ u``; forward mode solves ``∂_z F ż = −∂_θ F θ̇``.
  The adjoint solve is itself a differentiable, vmappable primitive, so second derivatives
  (double backward, ``jacfwd(jacrev(...))``) are exact.
* :class:`UnrollAdjoint` — differentiate through the solver's iterations (the baseline).
* :class:`OneStepAdjoint` — Jacobian-free backpropagation (Fung et al., 2022): replaces
  ``∂_z F`` by ``I``; for a fixed point (``F = z − T(z)``) this drops ``∂_z T``, exact only
  where ``∂T/∂z = 0``.
"""

from __future__ import annotations

import dataclasses

from .linear_solvers import Auto, LinearSolver, resolve_linear_solver

__all__ = ["ImplicitAdjoint", "UnrollAdjoint", "OneStepAdjoint", "Adjoint", "resolve_adjoint"]


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint:
    """Implicit differentiation with a matrix-free linear solve.

    Args:
        linear_solver: A linear-solver config (``CG()``, ``GMRES()``, ``Dense()``, ``Neumann(k, α)``,
            ...) or its name; ``Auto()`` (default) materializes small systems and goes
            matrix-free for large ones.
        symmetric: Declare ``∂_z F`` symmetric (None: trust the optimality function's own tag,
            e.g. :func:`stationarity` is symmetric).
        throw: Raise :class:`AdjointSolveError` in backward when the adjoint solve fails.

    Example:
        >>> from optlayers.implicit import ImplicitAdjoint, CG
        >>> adj = ImplicitAdjoint(linear_solver=CG(rtol=1e-12))
    """

    linear_solver: LinearSolver | str = dataclasses.field(default_factory=Auto)
    symmetric: bool | None = None
    throw: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_solver", resolve_linear_solver(self.linear_solver))
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool or None, got {self.symmetric!r}")


@dataclasses.dataclass(frozen=True)
class UnrollAdjoint:
    """Differentiate through the solver iterations (reverse-mode unrolling).

    Args:
        steps: If given, run exactly this many iterations (overrides the solver's ``max_iter``
            and switches its convergence test off).
        truncate: If given, only the last ``truncate`` iterations are differentiated
            (truncated backpropagation); the earlier ones run without a graph.
    """

    steps: int | None = None
    truncate: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive int or None, got {self.steps!r}")
        if self.truncate is not None and (not isinstance(self.truncate, int) or self.truncate < 1):
            raise ValueError(f"truncate must be a positive int or None, got {self.truncate!r}")
        if self.steps is not None and self.truncate is not None and self.truncate > self.steps:
            raise ValueError(f"truncate={self.truncate} must not exceed steps={self.steps}")


@dataclasses.dataclass(frozen=True)
class OneStepAdjoint:
    """Jacobian-free gradient: treat ``∂_z F`` as ``I`` (one differentiable step at z*).

    For a fixed point ``z = T(z, θ)`` this gives ``θ̄ = (∂_θ T)ᵀ ḡ`` (Fung et al., "JFB: Jacobian-Free
    Backpropagation for Implicit Networks", AAAI 2022). Cheap, approximate.
    """


Adjoint = ImplicitAdjoint | UnrollAdjoint | OneStepAdjoint


def resolve_adjoint(adjoint: Adjoint | str | None) -> Adjoint:
    """Map ``None`` / a name / a config to an adjoint config."""
    if adjoint is None:
        return ImplicitAdjoint()
    if isinstance(adjoint, (ImplicitAdjoint, UnrollAdjoint, OneStepAdjoint)):
        return adjoint
    if isinstance(adjoint, str):
        names = {"implicit": ImplicitAdjoint, "unroll": UnrollAdjoint, "one_step": OneStepAdjoint}
        key = adjoint.lower()
        if key not in names:
            raise ValueError(f"unknown adjoint {adjoint!r}; valid names: {sorted(names)}")
        return names[key]()
    raise ValueError(
        f"adjoint must be ImplicitAdjoint, UnrollAdjoint, OneStepAdjoint or a name, got {adjoint!r}")

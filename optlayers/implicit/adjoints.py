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
    r"""Differentiate through the solver iterations (reverse-mode unrolling).

    The solver's iterations ``z_{k+1} = Φ(z_k, θ)`` are recorded by autograd and backpropagated,
    so the gradient is that of the ``K``-th iterate, not of the exact solution:

    .. math::
        \frac{∂z_K}{∂θ} = \sum_{k=0}^{K-1} \Big(\prod_{j=k+1}^{K-1} ∂_z Φ(z_j, θ)\Big)\, ∂_θ Φ(z_k, θ),

    which tends to the implicit gradient as ``z_K → z*`` when ``Φ`` contracts. With
    ``truncate = m`` only the last ``m`` terms of the sum are kept. Memory grows with ``K``.

    Args:
        steps: If given, run exactly this many iterations (overrides the solver's ``max_iter``
            and switches its convergence test off).
        truncate: If given, only the last ``truncate`` iterations are differentiated
            (truncated backpropagation); the earlier ones run without a graph.

    Example:
        Three Picard steps on ``z = z/2 + a`` from ``z₀ = 0`` give ``z₃ = 1.75 a`` and
        ``∂z₃/∂a = 1 + ½ + ¼``; the exact fixed point ``z* = 2a`` has ``∂z*/∂a = 2``.

        >>> import torch
        >>> from optlayers.implicit import Picard, UnrollAdjoint, fixed_point
        >>> a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> T = lambda z, a: 0.5 * z + a
        >>> z0 = torch.zeros((), dtype=torch.float64)
        >>> r = fixed_point(T, z0, a, solver=Picard(), adjoint=UnrollAdjoint(steps=3), throw=False)
        >>> r.solution.item(), torch.autograd.grad(r.solution, a)[0].item()
        (1.75, 1.75)
        >>> r = fixed_point(T, z0, a, solver=Picard(), adjoint=UnrollAdjoint(steps=3, truncate=1), throw=False)
        >>> torch.autograd.grad(r.solution, a)[0].item()  # only the last step: ∂_θ Φ
        1.0
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
    Backpropagation for Implicit Networks", AAAI 2022). Cheap, approximate: the exact (implicit)
    gradient is ``θ̄ = (∂_θ T)ᵀ (I − ∂_z T)⁻ᵀ ḡ``, so the two agree only where ``∂_z T = 0``.

    Example:
        For ``T(z, a) = z/2 + a`` the fixed point is ``z* = 2a``: the exact gradient is
        ``(1 − ½)⁻¹ = 2``, the one-step gradient ``∂_a T = 1``.

        >>> import torch
        >>> from optlayers.implicit import OneStepAdjoint, fixed_point
        >>> a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> T = lambda z, a: 0.5 * z + a
        >>> r = fixed_point(T, torch.zeros((), dtype=torch.float64), a, adjoint=OneStepAdjoint())
        >>> round(r.solution.item(), 6), torch.autograd.grad(r.solution, a)[0].item()
        (2.0, 1.0)
    """


Adjoint = ImplicitAdjoint | UnrollAdjoint | OneStepAdjoint


def resolve_adjoint(adjoint: Adjoint | str | None) -> Adjoint:
    """Map ``None`` / a name / a config to an adjoint config.

    ``None`` means :class:`ImplicitAdjoint` (the implicit-function-theorem gradient); the names
    ``"implicit"``, ``"unroll"`` and ``"one_step"`` (any case) map to the defaults of the three
    configs; a config passes through unchanged.

    Raises:
        ValueError: An unknown name (the message lists the valid ones) or another type.

    Example:
        >>> resolve_adjoint("unroll")
        UnrollAdjoint(steps=None, truncate=None)
        >>> type(resolve_adjoint(None)).__name__
        'ImplicitAdjoint'
    """
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

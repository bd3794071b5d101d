"""Optimality conditions ``F(z, *params) = 0`` for :func:`custom_root` and the solvers.

The condition belongs to the problem, not to the solver: written once, it is the stopping test
and the gradient. Each builder returns ``F(z, *params)``; every user function it wraps is called
with all of ``params`` (write ``lambda z, *p: ...`` to ignore some).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["stationarity", "kkt", "projected_gradient_fp", "proximal_gradient_fp", "mirror_descent_fp"]

Fn = Callable[..., Any]


def _grad(f: Fn, z: Any, params: tuple[Any, ...]) -> Any:
    """Per-element gradient of a (batched) objective: ∇_z Σ_batch f(z, θ)."""
    return torch.func.grad(lambda zz: f(zz, *params).sum())(z)


def _tag(F: Fn, *, symmetric: bool = False, positive_definite: bool = False, doc: str = "") -> Fn:
    F.symmetric = symmetric  # type: ignore[attr-defined]
    F.positive_definite = positive_definite  # type: ignore[attr-defined]
    F.__doc__ = doc
    return F


def stationarity(f: Fn) -> Fn:
    """``F(z, θ) = ∇_z f(z, θ)``: the first-order condition of unconstrained minimization.

    ``∂_z F`` is the Hessian, symmetric (and positive definite at a strict local minimum, which
    this condition assumes when :class:`~optlayers.implicit.Auto` picks CG).

    Args:
        f: Objective ``f(z, *params)`` returning a scalar, or one value per batch element.

    Example:
        >>> import torch
        >>> F = stationarity(lambda z, a: ((z - a) ** 2).sum())
        >>> F(torch.zeros(2), torch.ones(2))
        tensor([-2., -2.])
    """

    def F(z: Any, *params: Any) -> Any:
        return _grad(f, z, params)

    return _tag(F, symmetric=True, positive_definite=True, doc="∇_z f(z, *params)")


def kkt(f: Fn, eq: Fn | None = None, ineq: Fn | None = None) -> Fn:
    """KKT conditions of ``min f(x)`` s.t. ``eq(x) = 0``, ``ineq(x) ≤ 0``.

    ``z = (x, ν, λ)`` (use ``None`` for an absent constraint's dual) and

    .. math::
        F(z, θ) = \\big(∇_x f + (∂_x \\mathrm{eq})ᵀ ν + (∂_x \\mathrm{ineq})ᵀ λ,\\;
        \\mathrm{eq}(x),\\; λ ⊙ \\mathrm{ineq}(x)\\big).

    Differentiating the complementarity row gives the OptNet/JAXopt sensitivity system; it is
    nonsingular under strict complementarity and the LICQ.

    Args:
        f: Objective ``f(x, *params)``.
        eq: Equality constraints ``eq(x, *params)`` (last dimension: constraints), or None.
        ineq: Inequality constraints ``ineq(x, *params) ≤ 0``, or None.

    Example:
        >>> import torch
        >>> F = kkt(lambda x: (x ** 2).sum(), eq=lambda x: x.sum(-1, keepdim=True) - 1)
        >>> x, nu = torch.full((2,), 0.5), torch.tensor([-1.0])
        >>> F((x, nu, None))
        (tensor([0., 0.]), tensor([0.]), None)
    """

    def F(z: Any, *params: Any) -> Any:
        x, nu, lam = z

        def lagrangian(xx: torch.Tensor) -> torch.Tensor:
            value = f(xx, *params).sum()
            if eq is not None:
                value = value + (nu * eq(xx, *params)).sum()
            if ineq is not None:
                value = value + (lam * ineq(xx, *params)).sum()
            return value

        stat = torch.func.grad(lagrangian)(x)
        r_eq = eq(x, *params) if eq is not None else None
        r_in = lam * ineq(x, *params) if ineq is not None else None
        return (stat, r_eq, r_in)

    return _tag(F, doc="KKT residual (stationarity, primal equality, complementary slackness)")


def projected_gradient_fp(f: Fn, projection: Fn, *, step: float = 1.0) -> Fn:
    """``F(z, θ) = proj(z − η ∇f(z, θ), θ) − z``: the projected-gradient fixed point.

    Zero exactly at the minimizers of ``f`` over the projection's convex set (any ``η > 0``).

    Args:
        f: Smooth objective ``f(z, *params)``.
        projection: ``projection(z, *params)`` onto the feasible set (differentiable a.e.).
        step: ``η``.

    Example:
        ``min ½‖z − a‖²`` over ``z ≥ 0`` is solved by ``z* = max(a, 0)``, where ``F`` vanishes:

        >>> import torch
        >>> F = projected_gradient_fp(lambda z, a: 0.5 * ((z - a) ** 2).sum(), lambda y, a: y.clamp_min(0))
        >>> a = torch.tensor([1.0, -1.0])
        >>> F(torch.tensor([1.0, 0.0]), a), F(torch.zeros(2), a)
        (tensor([0., 0.]), tensor([1., 0.]))
    """
    _check_step(step)

    def F(z: Any, *params: Any) -> Any:
        g = _grad(f, z, params)
        y = pytree.tree_map(lambda a, b: a - step * b, z, g)
        return pytree.tree_map(torch.sub, projection(y, *params), z)

    return _tag(F, doc="proj(z − η∇f) − z")


def proximal_gradient_fp(f: Fn, prox: Fn, *, step: float = 1.0) -> Fn:
    """``F(z, θ) = prox(z − η ∇f(z, θ), η, θ) − z``: the proximal-gradient fixed point.

    Zero exactly at the minimizers of ``f + g`` where ``prox`` is the proximal operator of ``g``.

    Args:
        f: Smooth part ``f(z, *params)``.
        prox: ``prox(z, step, *params)`` of the nonsmooth part.
        step: ``η``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.prox import prox_l1
        >>> F = proximal_gradient_fp(lambda z, lam: 0.5 * ((z - 2) ** 2).sum(),
        ...                          lambda z, s, lam: prox_l1(z, lam, s))
        >>> F(torch.tensor([1.0]), torch.tensor(1.0))
        tensor([0.])
    """
    _check_step(step)

    def F(z: Any, *params: Any) -> Any:
        g = _grad(f, z, params)
        y = pytree.tree_map(lambda a, b: a - step * b, z, g)
        return pytree.tree_map(torch.sub, prox(y, step, *params), z)

    return _tag(F, doc="prox(z − η∇f, η) − z")


def _softmax_last(y: torch.Tensor, *params: Any) -> torch.Tensor:
    return torch.softmax(y, dim=-1)


def _log(z: torch.Tensor, *params: Any) -> torch.Tensor:
    return torch.log(z)


def mirror_descent_fp(f: Fn, projection: Fn = _softmax_last, mapping: Fn = _log, *,
                      step: float = 1.0) -> Fn:
    """``F(z, θ) = projection(mapping(z) − η ∇f(z, θ), θ) − z``: the mirror-descent fixed point.

    With the defaults (``mapping = log``, ``projection = softmax`` over the last dimension) this is
    exponentiated gradient on the probability simplex (the KL mirror map), zero at the minimizers
    of ``f`` over the simplex that lie in its relative interior.

    Args:
        f: Objective ``f(z, *params)``.
        projection: ``∇φ*`` composed with the Bregman projection, called as ``projection(y, *params)``.
        mapping: The mirror map ``∇φ``, called as ``mapping(z, *params)``.
        step: ``η``.

    Example:
        The entropy-regularized linear objective ``f(z) = Σ z log z − cᵀz`` has the simplex
        minimizer ``z* = softmax(c)``:

        >>> import torch
        >>> F = mirror_descent_fp(lambda z, c: (z * torch.log(z)).sum() - (c * z).sum())
        >>> c = torch.tensor([1.0, 2.0, 3.0])
        >>> torch.allclose(F(torch.softmax(c, -1), c), torch.zeros(3), atol=1e-6)
        True
        >>> torch.allclose(F(torch.full((3,), 1 / 3), c), torch.zeros(3), atol=1e-6)
        False
    """
    _check_step(step)

    def F(z: Any, *params: Any) -> Any:
        g = _grad(f, z, params)
        return projection(mapping(z, *params) - step * g, *params) - z

    return _tag(F, doc="projection(mapping(z) − η∇f) − z")


def _check_step(step: float) -> None:
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a positive number, got {step!r}")

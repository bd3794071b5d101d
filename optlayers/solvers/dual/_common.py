r"""Shared pieces of the dual methods: the oracle, the result type and the entry point.

All methods maximize the Lagrangian dual function

.. math::

    q(\lambda) = \min_x f(x) + \lambda^\top g(x), \qquad \lambda_I \ge 0
    \;(\text{inequalities } g_I(x) \le 0),\; \lambda_E \text{ free (equalities)},

which is concave; ``g(x*(λ))`` is a supergradient. The inner minimization is any user callable
``inner(λ) -> x`` (exact, combinatorial, sampling-based, ...): the methods only see its output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._result import Result, register_aux

__all__ = ["DualInfo", "Oracle", "maximize_dual"]


@register_aux
@dataclasses.dataclass(frozen=True)
class DualInfo:
    r"""Extras of :func:`maximize_dual`.

    With :math:`q(\lambda) = \min_x f(x) + \lambda^\top g(x)`, weak duality gives
    ``value`` :math:`= q(\lambda) \le \max q \le f(x)` for every feasible :math:`x`, and
    ``upper_bound`` :math:`\ge \max q`.

    Attributes:
        value: ``q(λ)`` at the returned multipliers (a valid lower bound on the primal optimum
            when the inner solver is exact).
        upper_bound: The method's upper bound on ``max q`` (cut model value; ``inf`` for
            subgradient ascent without a target, the target itself with one).
        primal: Recovered primal point: the ergodic average for :class:`SubgradientAscent`,
            the convex combination of oracle points for :class:`ProximalBundle`, and ``None``
            for :class:`CuttingPlane` (no primal recovery; ``primal_violation`` is then empty).
        primal_violation: ``g(primal)``.
        oracle_calls: Number of inner solves.
        history: ``(oracle_calls,)`` best dual value after each call.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import maximize_dual, ProximalBundle
        >>> inner = lambda lam: lam.expand(2)          # argmin_x ½‖x‖² + λ(1 − x₁ − x₂) = (λ, λ)
        >>> f = lambda x: 0.5 * (x ** 2).sum()
        >>> g = lambda x: (1 - x.sum()).reshape(1)     # x₁ + x₂ ≥ 1;  q(λ) = λ − λ², max at λ = ½
        >>> lam0 = torch.zeros(1, dtype=torch.float64)
        >>> info = maximize_dual(inner, f, g, lam0, method=ProximalBundle()).aux
        >>> round(float(info.value), 6), round(float(info.upper_bound), 6)
        (0.25, 0.25)
        >>> [round(v, 6) for v in info.primal.tolist()], bool(info.primal_violation.abs().max() < 1e-6)
        ([0.5, 0.5], True)
        >>> bool(info.history.shape[0] == info.oracle_calls)
        True
    """

    value: Tensor
    upper_bound: Tensor
    primal: Any
    primal_violation: Tensor
    oracle_calls: Tensor
    history: Tensor


class Oracle:
    """Wraps ``inner``, ``objective`` and ``constraints`` into ``λ ↦ (q(λ), g(x*), x*)`` (float64 numpy)."""

    def __init__(self, inner: Callable[[Tensor], Any], objective: Callable[[Any], Tensor],
                 constraints: Callable[[Any], Tensor], like: Tensor) -> None:
        self.inner, self.objective, self.constraints, self.like = inner, objective, constraints, like
        self.calls = 0
        self.best = -np.inf
        self.history: list[float] = []

    def __call__(self, lam: np.ndarray) -> tuple[float, np.ndarray, Any]:
        with torch.no_grad():
            lt = torch.as_tensor(lam, dtype=self.like.dtype, device=self.like.device)
            x = self.inner(lt)
            gx = torch.as_tensor(self.constraints(x)).reshape(-1)
            q = float(torch.as_tensor(self.objective(x))) + float((lt * gx).sum())
        s = gx.detach().cpu().double().numpy()
        self.calls += 1
        self.best = max(self.best, q)
        self.history.append(self.best)
        return q, s, x


def combine_primal(points: list[Any], weights: np.ndarray) -> Any:
    """Convex combination of oracle outputs (tensors or pytrees of tensors)."""
    w = weights / max(weights.sum(), 1e-300)
    out = None
    for p, wi in zip(points, w, strict=False):
        if wi == 0:
            continue
        term = torch.utils._pytree.tree_map(lambda t: torch.as_tensor(t, dtype=torch.float64) * float(wi), p)
        out = term if out is None else torch.utils._pytree.tree_map(torch.add, out, term)
    return out if out is not None else points[-1]


def project(lam: np.ndarray, eq: np.ndarray, box: float | None) -> np.ndarray:
    out = np.where(eq, lam, np.maximum(lam, 0.0))
    if box is not None:
        out = np.clip(out, -box, box)
    return out


def maximize_dual(inner: Callable[[Tensor], Any], objective: Callable[[Any], Tensor],
                  constraints: Callable[[Any], Tensor], lam0: Tensor, *, method: Any = None,
                  eq: Tensor | None = None, throw: bool = True) -> Result[DualInfo]:
    r"""Maximize the Lagrangian dual ``q(λ) = min_x f(x) + λᵀg(x)`` with a user inner solver.

    Args:
        inner: ``inner(λ) -> x``, a minimizer of ``f(x) + λᵀ g(x)`` (any callable).
        objective: ``f(x) -> scalar``.
        constraints: ``g(x) -> (m,)`` (``g ≤ 0`` for inequalities, ``= 0`` where ``eq``).
        lam0: ``(m,)`` initial multipliers.
        method: :class:`SubgradientAscent`, :class:`CuttingPlane` or :class:`ProximalBundle`
            (default).
        eq: ``(m,)`` bool mask of equality constraints (free multipliers); default all inequalities.
        throw: Raise :class:`~optlayers.ConvergenceError` if the method's stopping test failed.

    Returns:
        A :class:`~optlayers.Result` with ``solution`` = λ and :class:`DualInfo` in ``aux``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import maximize_dual, ProximalBundle
        >>> f64 = torch.float64
        >>> p, w = torch.tensor([3., 2., 1.], dtype=f64), torch.tensor([[2., 2., 1.]], dtype=f64)
        >>> cap = torch.tensor([2.], dtype=f64)
        >>> inner = lambda lam: (p - w.T @ lam > 0).to(f64)       # max pᵀx − λᵀ(Wx − C), x ∈ {0,1}³
        >>> res = maximize_dual(inner, lambda x: -(p @ x), lambda x: w @ x - cap,
        ...                     torch.zeros(1, dtype=torch.float64), method=ProximalBundle())
        >>> round(float(res.aux.value), 6)   # = −(LP relaxation value 3.0)
        -3.0
    """
    from .bundle import ProximalBundle, run_bundle
    from .cutting_plane import CuttingPlane, run_cutting_plane
    from .subgradient import SubgradientAscent, run_subgradient

    method = ProximalBundle() if method is None else method
    lam0 = torch.as_tensor(lam0)
    if not lam0.is_floating_point():
        lam0 = lam0.to(torch.float64)
    if lam0.dim() != 1:
        raise ValueError(f"lam0 must be a vector (m,), got shape {tuple(lam0.shape)}")
    m = lam0.shape[0]
    eqm = np.zeros(m, dtype=bool) if eq is None else torch.as_tensor(eq).cpu().numpy().astype(bool).reshape(m)
    oracle = Oracle(inner, objective, constraints, lam0)
    if isinstance(method, SubgradientAscent):
        return run_subgradient(method, oracle, lam0, eqm, throw)
    if isinstance(method, CuttingPlane):
        return run_cutting_plane(method, oracle, lam0, eqm, throw)
    if isinstance(method, ProximalBundle):
        return run_bundle(method, oracle, lam0, eqm, throw)
    raise ValueError(f"method must be SubgradientAscent, CuttingPlane or ProximalBundle, got {method!r}")


def make_result(name: str, lam: np.ndarray, like: Tensor, converged: bool, iterations: int, residual: float,
                status: int, info: DualInfo, throw: bool, tol: float, max_iter: int) -> Result[DualInfo]:
    from ..._result import raise_if_failed

    res = Result(torch.as_tensor(lam, dtype=like.dtype, device=like.device), torch.tensor(converged),
                 torch.tensor(iterations, dtype=torch.int64), torch.tensor(residual, dtype=torch.float64),
                 torch.tensor(status, dtype=torch.int64), info)
    return raise_if_failed(name, res, throw, tol=tol, max_iter=max_iter)


def info_from(oracle: Oracle, value: float, upper: float, primal: Any, constraints: Callable[[Any], Tensor]
              ) -> DualInfo:
    with torch.no_grad():
        viol = torch.as_tensor(constraints(primal)).reshape(-1) if primal is not None else torch.zeros(0)
    return DualInfo(value=torch.tensor(value, dtype=torch.float64),
                    upper_bound=torch.tensor(upper, dtype=torch.float64),
                    primal=primal, primal_violation=viol.double(), oracle_calls=torch.tensor(oracle.calls),
                    history=torch.tensor(oracle.history, dtype=torch.float64))

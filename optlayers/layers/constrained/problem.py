r"""``ConstrainedProblem``: what a constrained-learning user writes.

.. math::

    \min_\theta f(\theta) \quad\text{s.t.}\quad g_i(\theta) \le 0,\; h_j(\theta) = 0.

Subclass :class:`ConstrainedProblem`, register each :class:`Constraint` as an attribute, and
implement :meth:`ConstrainedProblem.compute` returning a :class:`ProblemState`: the objective and,
for each constraint (by attribute name), a :class:`ConstraintState` with the differentiable proxy
violation and, optionally, the strict one. The problem is an ``nn.Module``: its ``state_dict``
holds every multiplier and penalty.

Example:
    >>> import torch
    >>> from optlayers.layers.constrained import Constraint, ConstrainedProblem, ConstraintState, ProblemState
    >>> class MinNorm(ConstrainedProblem):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.sum_ge_1 = Constraint("ineq")
    ...     def compute(self, x):
    ...         return ProblemState(0.5 * (x ** 2).sum(), {"sum_ge_1": ConstraintState(1 - x.sum())})
    >>> problem = MinNorm()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .constraint import Constraint, ConstraintState

__all__ = ["ConstrainedProblem", "ProblemState", "KKTResiduals", "kkt_residuals"]


@dataclasses.dataclass
class ProblemState:
    """Objective and constraint states at the current point.

    What :meth:`ConstrainedProblem.compute` returns: :math:`f(\\theta)` and, per constraint,
    :math:`g(\\theta)` (see :class:`ConstraintState`).

    Attributes:
        objective: Scalar, differentiable objective ``f``.
        constraints: ``{constraint attribute name: ConstraintState}``.

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import ConstraintState, ProblemState
        >>> x = torch.tensor([0.2, 0.3], dtype=torch.float64)
        >>> state = ProblemState(0.5 * (x ** 2).sum(), {"sum_ge_1": ConstraintState(1 - x.sum())})
        >>> round(float(state.objective), 3), round(float(state.constraints["sum_ge_1"].violation), 3)
        (0.065, 0.5)
    """

    objective: Tensor
    constraints: dict[str, ConstraintState] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class KKTResiduals:
    r"""KKT residuals at a point (all nonnegative scalars; zero at a KKT point).

    For :math:`\min f` s.t. :math:`g \le 0,\ h = 0` with multipliers :math:`(\lambda, \mu)`, a KKT
    point has :math:`\nabla f + \sum\lambda_i\nabla g_i + \sum\mu_j\nabla h_j = 0`,
    :math:`g \le 0`, :math:`h = 0`, :math:`\lambda \ge 0` and :math:`\lambda_i g_i = 0`; each field
    measures one of these conditions.

    Attributes:
        stationarity: ``‖∇_θ (f + Σ λᵢ gᵢ + Σ μⱼ hⱼ)‖₂`` with the current multipliers.
        primal_feasibility: ``max(max [g]₊, max |h|)`` (strict violations).
        dual_feasibility: ``max [−λ]₊`` over inequality multipliers.
        complementarity: ``max |λᵢ gᵢ|`` over inequality constraints.

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import KKTResiduals
        >>> zero = torch.zeros((), dtype=torch.float64)
        >>> KKTResiduals(zero, zero + 0.5, zero, zero).as_dict()["kkt/primal_feasibility"]
        0.5
    """

    stationarity: Tensor
    primal_feasibility: Tensor
    dual_feasibility: Tensor
    complementarity: Tensor

    def as_dict(self) -> dict[str, float]:
        return {f"kkt/{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}


class ConstrainedProblem(nn.Module):
    r"""Base class of constrained problems; see the module docstring.

    A subclass describes

    .. math::

        \min_\theta f(\theta) \quad\text{s.t.}\quad g_i(\theta) \le 0,\; h_j(\theta) = 0

    by registering one :class:`Constraint` attribute per constraint and returning
    :math:`f` and the violations from :meth:`compute`; :class:`ConstrainedOptimizer` solves it.

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import Constraint, ConstrainedProblem, ConstraintState, ProblemState
        >>> class MinNorm(ConstrainedProblem):  # min ½‖x‖² s.t. x₁ + x₂ ≥ 1
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.sum_ge_1 = Constraint("ineq")
        ...     def compute(self, x):
        ...         return ProblemState(0.5 * (x ** 2).sum(), {"sum_ge_1": ConstraintState(1 - x.sum())})
        >>> problem = MinNorm()
        >>> [name for name, _ in problem.named_constraints()]
        ['sum_ge_1']
        >>> problem.compute(torch.tensor([0.5, 0.5])).constraints["sum_ge_1"].violation
        tensor(0.)
        >>> sorted(problem.state_dict())  # the multipliers and penalties travel with the problem
        ['sum_ge_1.multiplier', 'sum_ge_1.penalty', 'sum_ge_1.prev_violation']
    """

    def compute(self, *args: Any, **kwargs: Any) -> ProblemState:
        """Return the objective and every constraint's state at the current parameters."""
        raise NotImplementedError("subclasses of ConstrainedProblem implement compute(...)")

    def named_constraints(self) -> Iterator[tuple[str, Constraint]]:
        """``(name, constraint)`` pairs of the registered constraints (submodule names)."""
        for name, mod in self.named_modules():
            if isinstance(mod, Constraint):
                yield name, mod

    def constraint(self, name: str) -> Constraint:
        mod = self.get_submodule(name)
        if not isinstance(mod, Constraint):
            raise KeyError(f"{name!r} is not a Constraint")
        return mod

    def check_state(self, state: ProblemState) -> None:
        """Raise if the state names unknown constraints or misses registered ones."""
        names = {n for n, _ in self.named_constraints()}
        given = set(state.constraints)
        if given - names:
            raise KeyError(f"compute() returned states for unknown constraints {sorted(given - names)}; "
                           f"registered constraints: {sorted(names)}")
        if names - given:
            raise KeyError(f"compute() returned no state for constraints {sorted(names - given)}")


def kkt_residuals(problem: ConstrainedProblem, params: list[Tensor] | Iterator[Tensor], *args: Any,
                  **kwargs: Any) -> KKTResiduals:
    """KKT residuals of ``problem`` at the current parameters and multipliers.

    Computes the residuals of :class:`KKTResiduals`: stationarity
    ``‖∇_θ (f + Σ λᵢ g̃ᵢ + Σ μⱼ h̃ⱼ)‖₂`` (by autograd through ``problem.compute``), primal
    feasibility of the strict violations, dual feasibility and complementarity. For a
    :class:`~optlayers.layers.constrained.QuadraticPenalty` constraint the multiplier
    estimate ``c[g]₊`` (or ``c h``) is used.

    Args:
        problem: The problem.
        params: The primal parameters θ.
        *args, **kwargs: Passed to ``problem.compute``.

    Returns:
        A :class:`KKTResiduals`.

    Example:
        At the solution of ``min ½‖x‖²`` s.t. ``x₁ + x₂ ≥ 1`` (``x = (½, ½)``, ``λ = ½``):

        >>> import torch
        >>> from optlayers.layers.constrained import (Constraint, ConstrainedProblem, ConstraintState,
        ...     ProblemState, kkt_residuals)
        >>> class MinNorm(ConstrainedProblem):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.x = torch.nn.Parameter(torch.full((2,), 0.5, dtype=torch.float64))
        ...         self.c = Constraint("ineq", init=0.5, dtype=torch.float64)
        ...     def compute(self):
        ...         return ProblemState(0.5 * (self.x ** 2).sum(), {"c": ConstraintState(1 - self.x.sum())})
        >>> p = MinNorm()
        >>> kkt_residuals(p, [p.x]).as_dict()
        {'kkt/stationarity': 0.0, 'kkt/primal_feasibility': 0.0, 'kkt/dual_feasibility': 0.0,
         'kkt/complementarity': 0.0}
        >>> with torch.no_grad():
        ...     _ = p.c.multiplier.fill_(0.0)
        >>> round(float(kkt_residuals(p, [p.x]).stationarity), 4)  # ‖x‖ = √½
        0.7071
    """
    params = [p for p in params]
    with torch.enable_grad():
        state = problem.compute(*args, **kwargs)
        problem.check_state(state)
        lag = state.objective
        pf, df, comp = [], [], []
        for name, con in problem.named_constraints():
            cs = state.constraints[name]
            lam = con.multiplier_estimate(cs)
            lag = lag + (lam * cs.violation).sum()
            s = cs.strict()
            pf.append(con.violation_measure(s).max() if s.numel() else s.new_zeros(()))
            if con.kind == "ineq" and s.numel():
                df.append((-lam).clamp_min(0).max())
                comp.append((lam * s).abs().max())
        grads = torch.autograd.grad(lag, params, allow_unused=True)
    sq = sum(((g.detach() ** 2).sum() for g in grads if g is not None), torch.zeros(()))
    zero = state.objective.detach().new_zeros(())
    mx = lambda xs: torch.stack([x.detach().to(zero.dtype) for x in xs]).max() if xs else zero  # noqa: E731
    return KKTResiduals(stationarity=torch.as_tensor(sq).sqrt().to(zero.dtype), primal_feasibility=mx(pf),
                        dual_feasibility=mx(df), complementarity=mx(comp))

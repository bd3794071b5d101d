r"""Constraints, their formulations and the per-constraint multiplier / penalty state.

A :class:`Constraint` is an ``nn.Module`` holding the multiplier(s) and penalty coefficient(s)
of one constraint as buffers, so they travel with ``state_dict``, ``.to(device)`` and DDP.
Constraints are written ``g(θ) ≤ 0`` (``kind="ineq"``) or ``h(θ) = 0`` (``kind="eq"``).

Formulations (per constraint; they can be mixed in one problem):

* :class:`Lagrangian` — primal term :math:`\lambda^\top \tilde g` (λ held fixed), dual step
  :math:`\lambda \leftarrow \Pi(\lambda + \eta\, g)`.
* :class:`AugmentedLagrangian` — the method of multipliers. Inequalities in Rockafellar's form
  :math:`P = \frac{1}{2c}\sum ([\lambda + c\tilde g]_+^2 - \lambda^2)`, equalities
  :math:`\mu^\top\tilde h + \frac c2\lVert\tilde h\rVert^2`; the dual step is
  :math:`\lambda \leftarrow [\lambda + \eta\, c\, g]_+` — **tied to the current penalty c
  automatically** (``η = 1`` is the textbook update, also after the penalty grows). At
  ``c = 0`` the limit :math:`\lambda^\top\tilde g` is used explicitly (no division by zero, no
  NaN) and the multiplier does not move.
* :class:`QuadraticPenalty` — :math:`\frac c2\lVert[\tilde g]_+\rVert^2` or
  :math:`\frac c2\lVert\tilde h\rVert^2`; no multiplier (its logged multiplier estimate is
  :math:`c[g]_+` or :math:`c h`).

Penalties of the last two grow by :class:`PenaltySchedule` (Nocedal & Wright, §17.4): after each
dual step, entries whose strict violation exceeds ``tol`` and did not fall below
``decrease`` × its previous value are multiplied by ``factor`` (up to ``max_penalty``).

Multipliers: dense (one per constraint entry, ``shape``), indexed (``num_samples``: one per
training sample, updated only where observed, with lazy dual-optimizer state), or predicted by a
model (``model``: ``λ = relu(model(features))`` for inequalities).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Constraint", "ConstraintState", "Lagrangian", "AugmentedLagrangian", "QuadraticPenalty",
           "PenaltySchedule", "Formulation"]


@dataclasses.dataclass(frozen=True)
class PenaltySchedule:
    r"""Penalty growth rule: ``c ← min(factor·c, max_penalty)`` where progress is insufficient.

    After each dual step, with :math:`v_t = [g]_+` (inequalities) or :math:`|h|` (equalities)
    the strict violation per entry,

    .. math::

        c_{t+1} = \begin{cases} \min(\text{factor}\cdot c_t,\ \text{max\_penalty})
        & \text{if } v_t > \text{tol} \text{ and } v_t > \text{decrease}\cdot v_{t-1},\\
        c_t & \text{otherwise,} \end{cases}

    with :math:`v_{-1} = \infty` (no growth at the first step).

    Args:
        factor: Growth factor (1 disables growth).
        tol: Violations at most ``tol`` never trigger growth.
        decrease: Growth happens only if the violation is above ``decrease`` × the violation at
            the previous dual step (Nocedal–Wright's "sufficient decrease" test).
        max_penalty: Upper bound of the penalty.

    Example:
        A violation that never decreases doubles the penalty at every step after the first:

        >>> import torch
        >>> from optlayers.layers.constrained import (Constraint, ConstrainedProblem, ConstraintState,
        ...     ProblemState, ConstrainedOptimizer, QuadraticPenalty, PenaltySchedule)
        >>> class Stuck(ConstrainedProblem):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.x = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        ...         self.c = Constraint("eq", dtype=torch.float64, formulation=QuadraticPenalty(
        ...             penalty=1.0, schedule=PenaltySchedule(factor=2.0, max_penalty=8.0)))
        ...     def compute(self):
        ...         return ProblemState(self.x ** 2, {"c": ConstraintState(self.x ** 2, torch.tensor(1.0))})
        >>> p = Stuck()
        >>> opt = ConstrainedOptimizer(p, torch.optim.SGD([p.x], lr=0.1))
        >>> [float(opt.step().constraints["c"].penalty) for _ in range(5)]
        [1.0, 2.0, 4.0, 8.0, 8.0]
    """

    factor: float = 1.0
    tol: float = 1e-4
    decrease: float = 0.25
    max_penalty: float = 1e6

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not (self.tol >= 0 and 0 <= self.decrease <= 1 and self.max_penalty > 0):
            raise ValueError("need tol >= 0, 0 <= decrease <= 1 and max_penalty > 0")


@dataclasses.dataclass(frozen=True)
class Lagrangian:
    r"""Plain Lagrangian formulation (gradient descent–ascent on ``f + λᵀg``).

    Primal term (multipliers held fixed) and dual step:

    .. math::

        P(\tilde g;\lambda) = \lambda^\top \tilde g, \qquad
        \lambda \leftarrow \Pi(\lambda + \eta\, g),

    with Π the projection onto :math:`\lambda \ge 0` for inequalities (identity for equalities).

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import Constraint, ConstraintState, Lagrangian
        >>> con = Constraint("ineq", shape=(2,), formulation=Lagrangian(), init=2.0, dtype=torch.float64)
        >>> con.primal_term(ConstraintState(torch.tensor([0.5, -1.0], dtype=torch.float64)))  # 2·0.5 + 2·(−1)
        tensor(-1., dtype=torch.float64)
    """


@dataclasses.dataclass(frozen=True)
class AugmentedLagrangian:
    r"""Augmented Lagrangian (method of multipliers) with penalty ``c ≥ 0``.

    Primal term (Rockafellar's form for inequalities) and dual step:

    .. math::

        P(\tilde g;\lambda, c) = \frac{1}{2c}\sum_i\big([\lambda_i + c\,\tilde g_i]_+^2 - \lambda_i^2\big),
        \qquad P(\tilde h;\mu, c) = \mu^\top\tilde h + \frac c2\lVert\tilde h\rVert^2,
        \qquad \lambda \leftarrow \Pi(\lambda + \eta\, c\, g),

    and :math:`P = \lambda^\top\tilde g` at ``c = 0`` (the Lagrangian limit).

    Args:
        penalty: Initial penalty coefficient ``c₀`` (0 is allowed: the Lagrangian limit).
        schedule: How ``c`` grows (default: constant).

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import Constraint, ConstraintState, AugmentedLagrangian
        >>> con = Constraint("ineq", shape=(2,), formulation=AugmentedLagrangian(penalty=2.0), init=1.0,
        ...                  dtype=torch.float64)
        >>> g = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> con.primal_term(ConstraintState(g))  # ((1 + 1)² − 1)/4 + (0 − 1)/4
        tensor(0.5000, dtype=torch.float64)
    """

    penalty: float = 1.0
    schedule: PenaltySchedule = dataclasses.field(default_factory=PenaltySchedule)

    def __post_init__(self) -> None:
        if not (self.penalty >= 0 and math.isfinite(self.penalty)):
            raise ValueError(f"penalty must be finite and >= 0, got {self.penalty}")


@dataclasses.dataclass(frozen=True)
class QuadraticPenalty:
    r"""Quadratic penalty ``(c/2)‖[g]₊‖²`` / ``(c/2)‖h‖²`` (no multiplier).

    .. math::

        P(\tilde g; c) = \frac c2\lVert[\tilde g]_+\rVert^2, \qquad
        P(\tilde h; c) = \frac c2\lVert\tilde h\rVert^2;

    the multiplier estimate logged (and used by :func:`kkt_residuals`) is :math:`c[g]_+` or
    :math:`c\,h`.

    Args:
        penalty: Initial penalty coefficient ``c₀ > 0``.
        schedule: How ``c`` grows (default: constant).

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import Constraint, ConstraintState, QuadraticPenalty
        >>> con = Constraint("ineq", shape=(2,), formulation=QuadraticPenalty(penalty=4.0), dtype=torch.float64)
        >>> state = ConstraintState(torch.tensor([0.5, -1.0], dtype=torch.float64))
        >>> con.primal_term(state)  # (4/2)·0.5²
        tensor(0.5000, dtype=torch.float64)
        >>> con.multiplier_estimate(state)
        tensor([2., 0.], dtype=torch.float64)
    """

    penalty: float = 1.0
    schedule: PenaltySchedule = dataclasses.field(default_factory=PenaltySchedule)

    def __post_init__(self) -> None:
        if not (self.penalty >= 0 and math.isfinite(self.penalty)):
            raise ValueError(f"penalty must be finite and >= 0, got {self.penalty}")


Formulation = Lagrangian | AugmentedLagrangian | QuadraticPenalty


@dataclasses.dataclass
class ConstraintState:
    """One constraint's values at the current point, as returned by ``compute``.

    Attributes:
        violation: Differentiable (proxy) violation ``g̃`` (``≤ 0`` / ``= 0`` is feasible); the
            constraint's ``shape`` for dense multipliers, ``(batch, *shape)`` for indexed and
            model multipliers.
        strict_violation: The true (possibly non-differentiable) violation ``g`` that drives
            the dual step; defaults to ``violation.detach()``.
        indices: ``(batch,)`` int64 sample indices (indexed multipliers only).
        features: Input of the multiplier model (model multipliers only).

    A constraint is satisfied when ``g ≤ 0`` (``kind="ineq"``) or ``g = 0`` (``kind="eq"``). The
    proxy ``g̃`` enters the primal loss; ``g`` (e.g. an error rate, whose gradient is zero almost
    everywhere) drives the multipliers.

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import ConstraintState
        >>> s = ConstraintState(torch.tensor(0.3, requires_grad=True), strict_violation=torch.tensor(0.5))
        >>> s.strict()  # the strict violation, detached
        tensor(0.5000)
        >>> ConstraintState(torch.tensor(0.3, requires_grad=True)).strict().requires_grad
        False
    """

    violation: Tensor
    strict_violation: Tensor | None = None
    indices: Tensor | None = None
    features: Tensor | None = None

    def strict(self) -> Tensor:
        s = self.strict_violation if self.strict_violation is not None else self.violation
        return s.detach()


class Constraint(nn.Module):
    """A constraint ``g ≤ 0`` or ``h = 0`` with its multiplier and penalty state.

    Args:
        kind: ``"ineq"`` or ``"eq"``.
        shape: Shape of the constraint (``()`` for a scalar constraint).
        num_samples: If given, one multiplier per sample (indexed multipliers): buffers of shape
            ``(num_samples, *shape)``, updated only at the indices observed in a step.
        model: If given, the multipliers are predicted, ``λ = relu(model(features))`` (ineq) or
            ``model(features)`` (eq); the model's parameters are the dual variables.
        formulation: :class:`Lagrangian` (default), :class:`AugmentedLagrangian` or
            :class:`QuadraticPenalty`.
        init: Initial multiplier value.
        dual: Optional per-constraint multiplier update rule (overrides the optimizer's).
        tol: Feasibility tolerance used for logging (``feasible`` flag) and nothing else.

    Example:
        >>> from optlayers.layers.constrained import Constraint, AugmentedLagrangian
        >>> rate = Constraint("ineq", formulation=AugmentedLagrangian(penalty=1.0))
        >>> float(rate.multiplier)
        0.0
    """

    multiplier: Tensor
    penalty: Tensor
    prev_violation: Tensor

    def __init__(self, kind: Literal["ineq", "eq"] = "ineq", *, shape: tuple[int, ...] = (),
                 num_samples: int | None = None, model: nn.Module | None = None,
                 formulation: Formulation | None = None, init: float = 0.0, dual: object | None = None,
                 tol: float = 0.0, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kind not in ("ineq", "eq"):
            raise ValueError(f"unknown constraint kind {kind!r}; valid kinds: ['eq', 'ineq']")
        formulation = Lagrangian() if formulation is None else formulation
        if not isinstance(formulation, (Lagrangian, AugmentedLagrangian, QuadraticPenalty)):
            raise ValueError(f"formulation must be Lagrangian, AugmentedLagrangian or QuadraticPenalty, "
                             f"got {formulation!r}")
        if num_samples is not None and model is not None:
            raise ValueError("a constraint has either indexed (num_samples) or model multipliers, not both")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if kind == "ineq" and init < 0:
            raise ValueError(f"an inequality multiplier must start >= 0, got init={init}")
        if model is not None and isinstance(formulation, QuadraticPenalty):
            raise ValueError("a QuadraticPenalty constraint has no multiplier to predict")
        self.kind = kind
        self.shape = tuple(shape)
        self.num_samples = num_samples
        self.formulation = formulation
        self.dual = dual
        self.tol = float(tol)
        self.model = model
        dtype = dtype or torch.get_default_dtype()
        full = ((num_samples,) if num_samples is not None else ()) + self.shape
        c0 = 0.0 if isinstance(formulation, Lagrangian) else formulation.penalty
        self.register_buffer("multiplier", torch.full(full, float(init), dtype=dtype))
        self.register_buffer("penalty", torch.full(full, float(c0), dtype=dtype))
        self.register_buffer("prev_violation", torch.full(full, float("inf"), dtype=dtype))

    @property
    def indexed(self) -> bool:
        return self.num_samples is not None

    @property
    def has_multiplier(self) -> bool:
        return not isinstance(self.formulation, QuadraticPenalty)

    def project(self, lam: Tensor) -> Tensor:
        """Project multipliers onto their domain (``λ ≥ 0`` for inequalities)."""
        return lam.clamp_min(0) if self.kind == "ineq" else lam

    def raw_model_output(self, state: ConstraintState) -> Tensor:
        """The multiplier model's output before the projection onto ``λ ≥ 0``."""
        if self.model is None:
            raise ValueError("this constraint has no multiplier model")
        if state.features is None:
            raise ValueError("a model-multiplier constraint needs ConstraintState.features")
        return self.model(state.features).reshape(state.violation.shape)

    def current(self, state: ConstraintState) -> Tensor:
        """The multipliers that pair with ``state.violation`` (differentiable for model multipliers)."""
        if self.model is not None:
            out = self.raw_model_output(state)
            return out.relu() if self.kind == "ineq" else out
        if self.indexed:
            if state.indices is None:
                raise ValueError("an indexed constraint needs ConstraintState.indices")
            return self.multiplier[state.indices]
        return self.multiplier

    def current_penalty(self, state: ConstraintState) -> Tensor:
        if self.indexed:
            assert state.indices is not None
            return self.penalty[state.indices]
        if self.model is not None:
            return self.penalty.expand(state.violation.shape) if self.penalty.dim() == 0 else self.penalty
        return self.penalty

    def primal_term(self, state: ConstraintState, global_violation: Tensor | None = None) -> Tensor:
        """The constraint's contribution to the primal loss (multipliers held fixed).

        Args:
            state: The constraint's state.
            global_violation: Under DDP, the all-reduced detached proxy violation; the nonlinear
                penalty terms then use the surrogate ``sg(w)·g̃`` with the weight ``w`` computed
                from the global value, so averaged gradients equal the single-process ones.
        """
        g = state.violation
        lam = self.current(state).detach()
        f = self.formulation
        if isinstance(f, Lagrangian):
            return (lam * g).sum()
        c = self.current_penalty(state)
        if global_violation is not None:
            gg = global_violation.detach()
            if isinstance(f, AugmentedLagrangian):
                w = (lam + c * gg).clamp_min(0) if self.kind == "ineq" else lam + c * gg
                if self.kind == "ineq":
                    w = torch.where(c > 0, w, lam)
            else:
                w = c * gg.clamp_min(0) if self.kind == "ineq" else c * gg
            return (w.detach() * g).sum()
        if isinstance(f, AugmentedLagrangian):
            if self.kind == "eq":
                return (lam * g + 0.5 * c * g * g).sum()
            pos = c > 0
            c_safe = torch.where(pos, c, torch.ones_like(c))
            al = ((lam + c_safe * g).clamp_min(0) ** 2 - lam * lam) / (2 * c_safe)
            return torch.where(pos, al, lam * g).sum()
        if self.kind == "eq":
            return (0.5 * c * g * g).sum()
        return (0.5 * c * g.clamp_min(0) ** 2).sum()

    def dual_signal(self, state: ConstraintState, strict: Tensor) -> Tensor:
        """The ascent direction of the multipliers: ``g`` (Lagrangian) or ``c·g`` (AL)."""
        if isinstance(self.formulation, AugmentedLagrangian):
            return self.current_penalty(state) * strict
        return strict

    def violation_measure(self, strict: Tensor) -> Tensor:
        """Nonnegative violation used by the penalty schedule and the feasible flag."""
        return strict.clamp_min(0) if self.kind == "ineq" else strict.abs()

    def multiplier_estimate(self, state: ConstraintState) -> Tensor:
        """The logged multiplier (for a quadratic penalty, its estimate ``c[g]₊`` or ``c h``)."""
        if isinstance(self.formulation, QuadraticPenalty):
            s = state.strict()
            return self.current_penalty(state) * (s.clamp_min(0) if self.kind == "ineq" else s)
        return self.current(state).detach()

    def extra_repr(self) -> str:
        mult = "indexed" if self.indexed else ("model" if self.model is not None else "dense")
        return f"kind={self.kind!r}, shape={self.shape}, multipliers={mult}, formulation={self.formulation}"

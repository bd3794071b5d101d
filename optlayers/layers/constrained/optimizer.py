r"""``ConstrainedOptimizer``: one primal ``torch.optim`` optimizer plus the multipliers.

Each :meth:`ConstrainedOptimizer.step` evaluates the problem and performs one primal–dual
update. With :math:`\tilde g` the proxy and :math:`g` the strict violations,

* primal: a step of the primal optimizer on
  :math:`L_\text{primal} = f + \sum_c P_c(\tilde g_c;\, \lambda_c, c_c)` (multipliers held
  fixed; :math:`P_c` from the constraint's formulation);
* dual: :math:`\lambda_c \leftarrow` rule(:math:`\lambda_c`, :math:`e_c`) with
  :math:`e_c = g_c` (Lagrangian) or :math:`c_c\, g_c` (augmented Lagrangian), then the penalty
  schedule.

Update orders (``scheme``):

* ``"simultaneous"`` — both steps from the same evaluation at :math:`(\theta_t, \lambda_t)`;
* ``"alternating_primal_dual"`` — primal step, then the violations are recomputed at
  :math:`\theta_{t+1}` (under ``no_grad``) for the dual step (one extra forward pass);
* ``"alternating_dual_primal"`` — dual step first, then the primal step uses
  :math:`\lambda_{t+1}` (same cost as simultaneous);
* ``"extragradient"`` — extrapolate both to :math:`t+\frac12`, evaluate there, and update from
  :math:`(\theta_t, \lambda_t)` with those gradients (two evaluations; exact with a
  momentum-free primal ``SGD``; dual rule must be :class:`GradientAscent`).

Under ``torch.distributed`` (``process_group="auto"`` and an initialized group of more than one
rank) global constraints average their violation over ranks before the dual step, so the
multipliers stay identical on every rank (see :mod:`optlayers.layers.constrained.ddp`).

Checkpointing: the multipliers and penalties are buffers of the problem
(``problem.state_dict()``); the primal optimizer state, the dual rules' state (nuPI's ξ, lazy
per-sample flags) and the step count are in :meth:`ConstrainedOptimizer.state_dict`. Restoring
both continues the trajectory exactly.

Example:
    >>> import torch
    >>> from optlayers.layers.constrained import (Constraint, ConstrainedProblem, ConstraintState,
    ...     ProblemState, ConstrainedOptimizer, GradientAscent)
    >>> class P(ConstrainedProblem):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.x = torch.nn.Parameter(torch.zeros(2))
    ...         self.c = Constraint("ineq")
    ...     def compute(self):
    ...         return ProblemState(0.5 * (self.x ** 2).sum(), {"c": ConstraintState(1 - self.x.sum())})
    >>> p = P()
    >>> opt = ConstrainedOptimizer(p, torch.optim.SGD([p.x], lr=0.1), dual=GradientAscent(lr=0.1))
    >>> for _ in range(300):
    ...     info = opt.step()
    >>> round(float(p.c.multiplier), 3)
    0.5
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from .constraint import AugmentedLagrangian, Constraint, ConstraintState, QuadraticPenalty
from .ddp import all_gather_indexed, all_reduce_mean, resolve_group
from .multipliers import DualRule, GradientAscent, NuPI, apply_rule, init_rule_state
from .problem import ConstrainedProblem, ProblemState

__all__ = ["ConstrainedOptimizer", "StepInfo", "ConstraintLog", "Scheme"]

Scheme = Literal["simultaneous", "alternating_primal_dual", "alternating_dual_primal", "extragradient"]
_SCHEMES = ("simultaneous", "alternating_primal_dual", "alternating_dual_primal", "extragradient")


@dataclasses.dataclass(frozen=True)
class ConstraintLog:
    """One constraint's logged values after a step (detached tensors).

    Attributes:
        violation: Proxy violation ``g̃``.
        strict_violation: Strict violation ``g`` used by the dual step (rank-averaged under DDP).
        multiplier: Multipliers paired with the violation (estimate ``c[g]₊`` for a quadratic penalty).
        penalty: Penalty coefficients (0 for a Lagrangian).
        feasible: Bool, whether every entry satisfies the constraint within its ``tol``:
            ``max [g]₊ ≤ tol`` (inequalities) or ``max |h| ≤ tol`` (equalities).

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import (Constraint, ConstrainedProblem, ConstraintState,
        ...     ProblemState, ConstrainedOptimizer, GradientAscent)
        >>> class MinNorm(ConstrainedProblem):  # min ½‖x‖² s.t. x₁ + x₂ ≥ 1
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        ...         self.c = Constraint("ineq", dtype=torch.float64)
        ...     def compute(self):
        ...         return ProblemState(0.5 * (self.x ** 2).sum(), {"c": ConstraintState(1 - self.x.sum())})
        >>> p = MinNorm()
        >>> opt = ConstrainedOptimizer(p, torch.optim.SGD([p.x], lr=0.1), dual=GradientAscent(lr=0.1))
        >>> log = opt.step().constraints["c"]  # evaluated at x = 0: g = 1, then λ ← 0 + 0.1·1
        >>> log.strict_violation, log.multiplier, bool(log.feasible)
        (tensor(1., dtype=torch.float64), tensor(0.1000, dtype=torch.float64), False)
    """

    violation: Tensor
    strict_violation: Tensor
    multiplier: Tensor
    penalty: Tensor
    feasible: Tensor


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What :meth:`ConstrainedOptimizer.step` returns.

    Attributes:
        objective: The objective ``f`` at the evaluated point.
        lagrangian: The primal loss that was differentiated.
        constraints: ``{name: ConstraintLog}``.

    ``lagrangian`` is :math:`f + \\sum_c P_c(\\tilde g_c; \\lambda_c, c_c)` with the multipliers
    before the step (see the module docstring).

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import (Constraint, ConstrainedProblem, ConstraintState,
        ...     ProblemState, ConstrainedOptimizer, GradientAscent)
        >>> class MinNorm(ConstrainedProblem):  # min ½‖x‖² s.t. x₁ + x₂ ≥ 1
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        ...         self.c = Constraint("ineq", dtype=torch.float64)
        ...     def compute(self):
        ...         return ProblemState(0.5 * (self.x ** 2).sum(), {"c": ConstraintState(1 - self.x.sum())})
        >>> p = MinNorm()
        >>> p.c.multiplier.fill_(1.0)
        tensor(1., dtype=torch.float64)
        >>> opt = ConstrainedOptimizer(p, torch.optim.SGD([p.x], lr=0.1))
        >>> info = opt.step()  # at x = 0: f = 0, f + λ g = 1
        >>> info.as_dict()
        {'objective': 0.0, 'lagrangian': 1.0, 'c/violation': 1.0, 'c/strict_violation': 1.0,
         'c/multiplier': 1.01, 'c/penalty': 0.0, 'c/feasible': 0.0}
    """

    objective: Tensor
    lagrangian: Tensor
    constraints: dict[str, ConstraintLog]

    def as_dict(self) -> dict[str, float]:
        """A flat ``{key: float}`` dict for any logger (one host synchronisation).

        Keys: ``objective``, ``lagrangian`` and, per constraint ``name``,
        ``name/violation``, ``name/strict_violation`` (largest entry; largest ``|·|`` for
        equalities), ``name/multiplier``, ``name/penalty`` (largest entry) and
        ``name/feasible`` (1.0 or 0.0).
        """
        out = {"objective": float(self.objective), "lagrangian": float(self.lagrangian)}
        for name, log in self.constraints.items():
            for key in ("violation", "strict_violation", "multiplier", "penalty"):
                t = getattr(log, key)
                out[f"{name}/{key}"] = float(t.max()) if t.numel() else 0.0
            out[f"{name}/feasible"] = float(bool(log.feasible))
        return out


class ConstrainedOptimizer:
    r"""Primal optimizer + multiplier updates for a :class:`ConstrainedProblem`.

    Seeks a saddle point of the Lagrangian of
    :math:`\min_\theta f(\theta)` s.t. :math:`g(\theta) \le 0,\ h(\theta) = 0` by alternating

    .. math::

        \theta \leftarrow \text{primal step on } f + \sum_c P_c(\tilde g_c;\, \lambda_c, c_c),
        \qquad \lambda_c \leftarrow \text{rule}(\lambda_c,\ e_c),

    with :math:`e_c = g_c` (Lagrangian) or :math:`c_c\,g_c` (augmented Lagrangian); the order of
    the two steps is ``scheme``.

    Args:
        problem: The problem (holds the constraints, multipliers and penalties).
        primal_optimizer: Any ``torch.optim.Optimizer`` over the primal parameters.
        dual: Default multiplier update rule (:class:`GradientAscent` or :class:`NuPI`); a
            constraint's own ``dual`` overrides it.
        scheme: Update order, see the module docstring.
        process_group: ``"auto"`` (default: synchronise over the default group when
            ``torch.distributed`` runs with several ranks), ``None`` (never), or a group.

    Example:
        Gradient descent–ascent reaches ``x = (½, ½)``, ``λ = ½``:

        >>> import torch
        >>> from optlayers.layers.constrained import (Constraint, ConstrainedProblem, ConstraintState,
        ...     ProblemState, ConstrainedOptimizer, GradientAscent)
        >>> class MinNorm(ConstrainedProblem):  # min ½‖x‖² s.t. x₁ + x₂ ≥ 1
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        ...         self.c = Constraint("ineq", dtype=torch.float64)
        ...     def compute(self):
        ...         return ProblemState(0.5 * (self.x ** 2).sum(), {"c": ConstraintState(1 - self.x.sum())})
        >>> p = MinNorm()
        >>> opt = ConstrainedOptimizer(p, torch.optim.SGD([p.x], lr=0.1), dual=GradientAscent(lr=0.1))
        >>> for _ in range(300):
        ...     info = opt.step()
        >>> [round(v, 3) for v in p.x.tolist()], round(float(p.c.multiplier), 3)
        ([0.5, 0.5], 0.5)
        >>> sorted(opt.state_dict())  # checkpoint it beside p.state_dict()
        ['dual', 'primal', 'scheme', 'steps']
    """

    def __init__(self, problem: ConstrainedProblem, primal_optimizer: torch.optim.Optimizer, *,
                 dual: DualRule | None = None, scheme: Scheme = "simultaneous",
                 process_group: Any = "auto") -> None:
        if not isinstance(problem, ConstrainedProblem):
            raise TypeError(f"problem must be a ConstrainedProblem, got {type(problem).__name__}")
        if not isinstance(primal_optimizer, torch.optim.Optimizer):
            raise TypeError(f"primal_optimizer must be a torch.optim.Optimizer, got {type(primal_optimizer).__name__}")
        if scheme not in _SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {list(_SCHEMES)}")
        self.problem = problem
        self.primal = primal_optimizer
        self.dual = dual if dual is not None else GradientAscent()
        if not isinstance(self.dual, (GradientAscent, NuPI)):
            raise ValueError(f"dual must be GradientAscent or NuPI, got {self.dual!r}")
        self.scheme = scheme
        self.process_group = process_group
        self.steps = 0
        self._dual_state: dict[str, dict[str, Tensor]] = {}
        self._cons: list[tuple[str, Constraint]] | None = None
        if scheme == "extragradient":
            for name, con in problem.named_constraints():
                if not isinstance(self._rule(con), GradientAscent):
                    raise ValueError(f"extragradient needs GradientAscent multipliers; constraint {name!r} "
                                     f"uses {self._rule(con)!r}")

    # ------------------------------------------------------------------ helpers
    def _constraints(self) -> list[tuple[str, Constraint]]:
        if self._cons is None:
            self._cons = list(self.problem.named_constraints())
        return self._cons

    def _rule(self, con: Constraint) -> DualRule:
        rule = con.dual if con.dual is not None else self.dual
        if not isinstance(rule, (GradientAscent, NuPI)):
            raise ValueError(f"a constraint's dual rule must be GradientAscent or NuPI, got {rule!r}")
        return rule

    def _group(self) -> Any:
        return resolve_group(self.process_group)

    def _state_for(self, name: str, con: Constraint) -> dict[str, Tensor]:
        if name not in self._dual_state:
            if con.model is not None:
                self._dual_state[name] = {}
            else:
                self._dual_state[name] = init_rule_state(self._rule(con), con.multiplier)
        return self._dual_state[name]

    def _compute(self, args: tuple, kwargs: dict) -> ProblemState:
        state = self.problem.compute(*args, **kwargs)
        if not isinstance(state, ProblemState):
            raise TypeError(f"compute() must return a ProblemState, got {type(state).__name__}")
        if set(state.constraints) != {n for n, _ in self._constraints()}:
            self.problem.check_state(state)
        return state

    def _primal_loss(self, state: ProblemState, group: Any) -> Tensor:
        loss = state.objective
        for name, con in self._constraints():
            cs = state.constraints[name]
            gv = None
            if group is not None and not con.indexed and con.model is None and \
                    isinstance(con.formulation, (AugmentedLagrangian, QuadraticPenalty)):
                gv = all_reduce_mean(cs.violation.detach(), group)
            loss = loss + con.primal_term(cs, gv)
        return loss

    def _dual_step(self, state: ProblemState, group: Any, *, grow: bool = True) -> dict[str, Tensor]:
        stricts: dict[str, Tensor] = {}
        for name, con in self._constraints():
            cs = state.constraints[name]
            strict = cs.strict()
            if con.model is not None:
                self._model_step(name, con, cs, strict)
                stricts[name] = strict
                continue
            if con.indexed:
                idx = cs.indices
                assert idx is not None
                if group is not None:
                    idx, strict = all_gather_indexed(idx, strict, group)
                uniq = torch.unique(idx)
                if uniq.numel() < idx.numel():  # repeated samples: sum their signals
                    uniq, inv = torch.unique(idx, return_inverse=True)
                    strict = strict.new_zeros((uniq.numel(),) + tuple(strict.shape[1:])).index_add_(0, inv, strict)
                    idx = uniq
                stricts[name] = strict
                if con.has_multiplier:
                    e = con.dual_signal(ConstraintState(strict, indices=idx), strict)
                    apply_rule(self._rule(con), con.multiplier, e, self._state_for(name, con), con.project,
                               indices=idx)
                if grow:
                    self._grow(con, strict, idx)
                continue
            if group is not None:
                strict = all_reduce_mean(strict, group)
            stricts[name] = strict
            if con.has_multiplier:
                e = con.dual_signal(cs, strict)
                apply_rule(self._rule(con), con.multiplier, e, self._state_for(name, con), con.project)
            if grow:
                self._grow(con, strict, None)
        return stricts

    def _model_step(self, name: str, con: Constraint, cs: ConstraintState, strict: Tensor) -> None:
        rule = self._rule(con)
        assert con.model is not None
        params = [p for p in con.model.parameters() if p.requires_grad]
        with torch.enable_grad():
            # projected ascent: step the pre-projection output (relu'(0) = 0 would freeze λ = 0)
            lam = con.raw_model_output(cs)
            dual_obj = (lam * con.dual_signal(cs, strict)).sum()
            grads = torch.autograd.grad(dual_obj, params, allow_unused=True)
        st = self._state_for(name, con)
        for i, (p, g) in enumerate(zip(params, grads, strict=False)):
            if g is None:
                continue
            key = f"p{i}"
            if key not in st and isinstance(rule, NuPI):
                st[key + "/xi"] = torch.zeros_like(p)
                st[key + "/seen"] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            sub = {k.split("/")[1]: v for k, v in st.items() if k.startswith(key + "/")}
            apply_rule(rule, p.data, g, sub, lambda t: t)

    def _grow(self, con: Constraint, strict: Tensor, idx: Tensor | None) -> None:
        f = con.formulation
        if not isinstance(f, (AugmentedLagrangian, QuadraticPenalty)):
            return
        s = f.schedule
        viol = con.violation_measure(strict)
        with torch.no_grad():
            c = con.penalty if idx is None else con.penalty[idx]
            prev = con.prev_violation if idx is None else con.prev_violation[idx]
            if s.factor > 1:
                grow = (viol > s.tol) & (viol > s.decrease * prev)
                c = torch.where(grow, (c * s.factor).clamp_max(s.max_penalty), c)
            if idx is None:
                con.penalty.copy_(c)
                con.prev_violation.copy_(viol)
            else:
                con.penalty[idx] = c
                con.prev_violation[idx] = viol

    def _log(self, state: ProblemState, stricts: dict[str, Tensor]) -> dict[str, ConstraintLog]:
        logs = {}
        for name, con in self._constraints():
            cs = state.constraints[name]
            strict = stricts.get(name, cs.strict())
            meas = con.violation_measure(strict)
            est_state = ConstraintState(cs.violation.detach(), strict, cs.indices, cs.features)
            if con.indexed and cs.indices is not None and strict.shape[0] != cs.indices.shape[0]:
                est_state = ConstraintState(cs.violation.detach(), cs.strict(), cs.indices, cs.features)
            with torch.no_grad():
                mult = con.multiplier_estimate(est_state).detach()
                pen = con.current_penalty(est_state).detach().clone()
            logs[name] = ConstraintLog(violation=cs.violation.detach(), strict_violation=strict.detach(),
                                       multiplier=mult.clone(), penalty=pen,
                                       feasible=(meas <= con.tol).all() if meas.numel() else torch.tensor(True))
        return logs

    # ------------------------------------------------------------------ public API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the primal gradients."""
        self.primal.zero_grad(set_to_none=set_to_none)

    def step(self, *args: Any, **kwargs: Any) -> StepInfo:
        """Evaluate ``problem.compute(*args, **kwargs)`` and take one primal–dual step.

        Returns:
            A :class:`StepInfo` (call ``.as_dict()`` for a logger).
        """
        group = self._group()
        if self.scheme == "extragradient":
            return self._extragradient(args, kwargs, group)
        state = self._compute(args, kwargs)
        if self.scheme == "alternating_dual_primal":
            stricts = self._dual_step(state, group)
            loss = self._primal_loss(state, group)
            self.zero_grad()
            loss.backward()
            self.primal.step()
            log_state = state
        else:
            loss = self._primal_loss(state, group)
            self.zero_grad()
            loss.backward()
            self.primal.step()
            if self.scheme == "alternating_primal_dual":
                with torch.no_grad():
                    log_state = self._compute(args, kwargs)
            else:
                log_state = state
            stricts = self._dual_step(log_state, group)
        self.steps += 1
        return StepInfo(objective=state.objective.detach(), lagrangian=loss.detach(),
                        constraints=self._log(log_state, stricts))

    def _extragradient(self, args: tuple, kwargs: dict, group: Any) -> StepInfo:
        params = [p for g in self.primal.param_groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        cons = list(self._constraints())
        saved_dual = {n: (c.multiplier.clone(), c.penalty.clone(), c.prev_violation.clone()) for n, c in cons}
        state = self._compute(args, kwargs)
        loss = self._primal_loss(state, group)
        self.zero_grad()
        loss.backward()
        self.primal.step()
        self._dual_step(state, group, grow=False)
        half = self._compute(args, kwargs)
        loss_h = self._primal_loss(half, group)
        self.zero_grad()
        loss_h.backward()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=False):
                p.copy_(s)
            for n, c in cons:
                m, pen, pv = saved_dual[n]
                c.multiplier.copy_(m)
                c.penalty.copy_(pen)
                c.prev_violation.copy_(pv)
        self.primal.step()
        stricts = self._dual_step(half, group)
        self.steps += 1
        return StepInfo(objective=state.objective.detach(), lagrangian=loss.detach(),
                        constraints=self._log(half, stricts))

    def state_dict(self) -> dict[str, Any]:
        """Primal optimizer state, dual-rule state and step count (multipliers are in the problem's)."""
        return {"primal": self.primal.state_dict(),
                "dual": {n: {k: v.clone() for k, v in st.items()} for n, st in self._dual_state.items()},
                "steps": self.steps, "scheme": self.scheme}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state.get("scheme", self.scheme) != self.scheme:
            raise ValueError(f"checkpoint was saved with scheme {state['scheme']!r}, "
                             f"this optimizer uses {self.scheme!r}")
        self.primal.load_state_dict(state["primal"])
        self._dual_state = {n: {k: v.clone() for k, v in st.items()} for n, st in state["dual"].items()}
        self.steps = int(state["steps"])

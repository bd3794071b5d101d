r"""Multiplier update rules: projected gradient ascent and nuPI (PI), dense and indexed alike.

Each rule maps the current multipliers :math:`\lambda_t`, the ascent signal :math:`e_t` (the
strict violation, times the penalty for an augmented Lagrangian) and its own state to
:math:`\lambda_{t+1}`. Every operation is elementwise, and an indexed (per-sample) update
gathers the observed entries, applies *the same* elementwise arithmetic and scatters back, so a
dense multiplier and an indexed one with every index observed follow bit-identical
trajectories. State of entries not observed in a step is left untouched (lazy state).

* :class:`GradientAscent`: :math:`\lambda_{t+1} = \Pi(\lambda_t + \eta e_t)`.
* :class:`NuPI` (Sohrabi et al., ICML 2024):

  .. math::

      \xi_t = \nu\,\xi_{t-1} + (1-\nu)\, e_t, \qquad
      \lambda_{t+1} = \Pi\big(\lambda_t + \eta\,(K_I e_t + K_P(\xi_t - \xi_{t-1}))\big),

  with ``init="sgd"`` setting :math:`\xi_{-1} = e_0` per entry at its first observation (so the
  first step is gradient ascent with gain :math:`K_I`), or ``init="zeros"`` (:math:`\xi_{-1}=0`).
  :math:`K_P = 0,\ \nu = 0` is gradient ascent; :math:`K_P = K_I = 1,\ \nu = 0` is optimistic
  gradient ascent; ``nu=0`` is a PI controller.

Π is the projection onto :math:`\lambda \ge 0` for inequality constraints (identity for
equalities).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = ["GradientAscent", "NuPI", "DualRule", "apply_rule", "init_rule_state"]


@dataclasses.dataclass(frozen=True)
class GradientAscent:
    r"""Projected gradient ascent ``λ ← Π(λ + lr·e)``.

    .. math::

        \lambda_{t+1} = \Pi(\lambda_t + \eta\, e_t),

    with :math:`e_t` the strict violation (times the penalty for an augmented Lagrangian) and Π
    the projection onto :math:`\lambda \ge 0` for inequalities.

    Args:
        lr: Dual step size η (for an augmented Lagrangian ``1.0`` gives the method of multipliers).

    Example:
        >>> import torch
        >>> from optlayers.layers.constrained import GradientAscent
        >>> from optlayers.layers.constrained.multipliers import apply_rule
        >>> lam = torch.zeros(2, dtype=torch.float64)
        >>> e = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> apply_rule(GradientAscent(lr=0.1), lam, e, {}, lambda t: t.clamp_min(0))
        tensor([0.0500, 0.0000], dtype=torch.float64)
    """

    lr: float = 1e-2

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class NuPI:
    r"""The nuPI multiplier controller (Sohrabi et al., ICML 2024).

    .. math::

        \xi_t = \nu\,\xi_{t-1} + (1-\nu)\, e_t, \qquad
        \lambda_{t+1} = \Pi\big(\lambda_t + \eta\,(K_I e_t + K_P(\xi_t - \xi_{t-1}))\big),

    with :math:`\xi_{-1} = e_0` (``init="sgd"``) or 0 (``init="zeros"``). ``kp=0, nu=0`` is
    :class:`GradientAscent`; ``kp=ki=1, nu=0`` is optimistic gradient ascent.

    Args:
        lr: Step size η.
        kp: Proportional gain ``K_P``.
        ki: Integral gain ``K_I``.
        nu: EMA coefficient ν ∈ [0, 1).
        init: ``"sgd"`` (ξ₋₁ = e₀, the documented recursion) or ``"zeros"`` (ξ₋₁ = 0).

    Example:
        Optimistic ascent: the second step adds ``K_I e₁ + K_P (e₁ − e₀) = 2 + 1``.

        >>> import torch
        >>> from optlayers.layers.constrained import NuPI
        >>> from optlayers.layers.constrained.multipliers import apply_rule, init_rule_state
        >>> rule = NuPI(lr=1.0, kp=1.0, ki=1.0)
        >>> lam = torch.zeros(1, dtype=torch.float64)
        >>> state = init_rule_state(rule, lam)
        >>> for e in (1.0, 2.0):
        ...     _ = apply_rule(rule, lam, torch.tensor([e], dtype=torch.float64), state, lambda t: t.clamp_min(0))
        >>> lam
        tensor([4.], dtype=torch.float64)
    """

    lr: float = 1e-2
    kp: float = 0.0
    ki: float = 1.0
    nu: float = 0.0
    init: Literal["sgd", "zeros"] = "sgd"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.nu < 1:
            raise ValueError(f"nu must be in [0, 1), got {self.nu}")
        if self.kp < 0 or self.ki < 0:
            raise ValueError("kp and ki must be >= 0")
        if self.init not in ("sgd", "zeros"):
            raise ValueError(f"unknown init {self.init!r}; valid values: ['sgd', 'zeros']")


DualRule = GradientAscent | NuPI


def init_rule_state(rule: DualRule, like: Tensor) -> dict[str, Tensor]:
    """Fresh state of ``rule`` for multipliers shaped like ``like``."""
    if isinstance(rule, NuPI):
        return {"xi": torch.zeros_like(like), "seen": torch.zeros(like.shape, dtype=torch.bool, device=like.device)}
    return {}


def _step(rule: DualRule, lam: Tensor, e: Tensor, state: dict[str, Tensor],
          project: Callable[[Tensor], Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    if isinstance(rule, GradientAscent):
        return project(lam + rule.lr * e), state
    xi_prev = state["xi"]
    if rule.init == "sgd":
        xi_prev = torch.where(state["seen"], xi_prev, e)
    else:
        xi_prev = torch.where(state["seen"], xi_prev, torch.zeros_like(e))
    xi = rule.nu * xi_prev + (1 - rule.nu) * e
    new = project(lam + rule.lr * (rule.ki * e + rule.kp * (xi - xi_prev)))
    return new, {"xi": xi, "seen": torch.ones_like(state["seen"])}


def apply_rule(rule: DualRule, lam: Tensor, e: Tensor, state: dict[str, Tensor],
               project: Callable[[Tensor], Tensor], indices: Tensor | None = None) -> Tensor:
    """Update ``lam`` (and ``state``, in place) with signal ``e``; only ``indices`` if given.

    Args:
        rule: The update rule.
        lam: Multipliers (full tensor; updated in place and returned).
        e: Ascent signal: ``lam``'s shape, or ``(len(indices), *shape)`` for indexed updates.
        state: The rule's state (full size), updated in place.
        project: Projection onto the multipliers' domain.
        indices: Observed entries (unique) for an indexed update.
    """
    with torch.no_grad():
        if indices is None:
            new, st = _step(rule, lam, e, state, project)
            lam.copy_(new)
            for k, v in st.items():
                state[k].copy_(v)
            return lam
        sub = {k: v[indices] for k, v in state.items()}
        new, st = _step(rule, lam[indices], e, sub, project)
        lam[indices] = new
        for k, v in st.items():
            state[k][indices] = v
        return lam

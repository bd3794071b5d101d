r"""Batch-level dual ascent on expectation constraints for group-relative policy optimization.

For constraints :math:`\mathbb E[c_j] \ge \tau_j` (e.g. consistency or grounding rates, as in
Faithful GRPO), the multipliers move on the *batch* constraint rates,

.. math::

    \lambda_j \leftarrow [\lambda_j + \eta(\tau_j - \hat c_{j,B})]_+,

and enter the group advantage after **per-component normalization**,

.. math::

    A_i = \hat A^{R}_i + \sum_j \lambda_j \hat A^{c_j}_i, \qquad
    \hat A^{v}_i = \frac{v_i - \operatorname{mean}_{G(i)} v}{\operatorname{std}_{G(i)} v + \epsilon},

each component normalized within its group *before* scalarization (scalarizing first lets the
component with the largest spread dominate and mis-weights λ; Constrained GRPO, 2026).

References:
    Kancheti et al. (2026). Faithful GRPO. arXiv:2604.08476.
    Shao et al. (2024). DeepSeekMath (GRPO). arXiv:2402.03300.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["group_normalize", "constrained_group_advantages", "GroupDualAscent"]


def group_normalize(values: Tensor, eps: float = 1e-6) -> Tensor:
    r"""Normalize ``values (..., G, K)`` within each group (last dim: the K samples of a group).

    .. math::

        \hat v_{gk} = \frac{v_{gk} - \operatorname{mean}_k v_{g\cdot}}{\operatorname{std}_k v_{g\cdot} + \epsilon}

    (population standard deviation); a group with equal values maps to zeros.

    Args:
        values: ``(..., G, K)``.
        eps: Added to the standard deviation.

    Returns:
        The normalized values, same shape.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import group_normalize
        >>> group_normalize(torch.tensor([[1.0, 0.0, 1.0, 0.0], [3.0, 3.0, 3.0, 3.0]]))
        tensor([[ 1.0000, -1.0000,  1.0000, -1.0000],
                [ 0.0000,  0.0000,  0.0000,  0.0000]])
    """
    mean = values.mean(-1, keepdim=True)
    std = values.std(-1, keepdim=True, unbiased=False)
    return (values - mean) / (std + eps)


def constrained_group_advantages(reward: Tensor, constraints: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    r"""``A = norm(R) + Σ_j λ_j norm(c_j)`` with ``reward (G, K)``, ``constraints (J, G, K)``, ``lam (J,)``.

    .. math::

        A_{gk} = \hat R_{gk} + \sum_j \lambda_j\, \hat c_{j,gk},

    with :math:`\hat\cdot` the per-group normalization of :func:`group_normalize`, applied to each
    component *before* they are combined.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import constrained_group_advantages
        >>> reward = torch.tensor([[1.0, 0.0, 1.0, 0.0]])           # one group of 4 samples
        >>> grounded = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])        # one constraint
        >>> constrained_group_advantages(reward, grounded, torch.tensor([0.5]))
        tensor([[ 1.5000, -0.5000,  0.5000, -1.5000]])
    """
    comp = group_normalize(constraints, eps)
    return group_normalize(reward, eps) + (lam.reshape(-1, *([1] * (comp.dim() - 1))) * comp).sum(0)


class GroupDualAscent(nn.Module):
    """Multipliers for batch constraints ``E[c_j] ≥ τ_j`` (a buffer, so it is checkpointed).

    Args:
        targets: ``(J,)`` thresholds τ.
        lr: Dual step η.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dual import GroupDualAscent
        >>> dual = GroupDualAscent(torch.tensor([0.9]), lr=0.5)
        >>> _ = dual.update(torch.tensor([[0.5, 1.0, 1.0, 0.0]]))   # batch rate 0.625 < 0.9
        >>> round(float(dual.multiplier), 4)
        0.1375
    """

    multiplier: Tensor

    def __init__(self, targets: Tensor, lr: float = 0.1) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.register_buffer("targets", torch.as_tensor(targets, dtype=torch.get_default_dtype()).reshape(-1))
        self.register_buffer("multiplier", torch.zeros_like(self.targets))
        self.targets: Tensor
        self.multiplier: Tensor

    @torch.no_grad()
    def update(self, constraint_values: Tensor) -> Tensor:
        """One dual step from per-sample values ``(J, ...)``; returns the new multipliers."""
        rates = constraint_values.reshape(self.targets.shape[0], -1).mean(-1).to(self.multiplier.dtype)
        self.multiplier.copy_((self.multiplier + self.lr * (self.targets - rates)).clamp_min(0))
        return self.multiplier.clone()

    def advantages(self, reward: Tensor, constraints: Tensor, eps: float = 1e-6) -> Tensor:
        """Group advantages with the current multipliers (see the module docstring)."""
        return constrained_group_advantages(reward, constraints, self.multiplier, eps)

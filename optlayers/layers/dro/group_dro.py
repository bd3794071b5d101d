r"""``GroupDROLoss``: online group DRO (Sagawa, Koh, Hashimoto & Liang, ICLR 2020, Algorithm 1).

.. math:: \min_\theta \max_{q\in\Delta_G} \sum_g q_g \hat L_g(\theta)

with :math:`\hat L_g` the mean loss of group :math:`g` in the batch. Each training step:

1. per-group sums and counts of the batch losses (groups passed as ``group_ids``, never read
   from the features);
2. exponentiated-gradient ascent, *only for groups present in the batch*:
   :math:`q_g \leftarrow q_g \exp\big(\eta_q(\hat L_g + C_g/\sqrt{n_g})\big)`, then normalise
   (:math:`C_g/\sqrt{n_g}` is the generalisation adjustment, :math:`n_g` the group's
   *training-set* size);
3. the loss :math:`\sum_g q_g \hat L_g` with :math:`q` held constant (absent groups contribute 0).

The weights :math:`q` are a buffer (in ``state_dict``) and are updated only in training mode.
Sagawa et al. show that strong :math:`\ell_2` regularisation or early stopping is essential for
the worst-group gains to generalise.

Under DDP (``process_group=``) the group sums and counts are all-reduced before the update, so
:math:`q` stays identical on every rank, and the local share is scaled by the world size so
that DDP's gradient averaging yields the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...distributed import all_reduce_sum, is_distributed, resolve_group, world_size
from .dro_loss import Criterion, per_example_losses

__all__ = ["GroupDROLoss"]


class GroupDROLoss(nn.Module):
    r"""Online group DRO loss with exponentiated-gradient group weights.

    Each training step updates :math:`q_g \leftarrow q_g e^{\eta_q(\hat L_g + C_g/\sqrt{n_g})} /
    \sum_h q_h e^{\eta_q(\hat L_h + C_h/\sqrt{n_h})}` (groups present in the batch) and returns
    :math:`\sum_g q_g \hat L_g` with :math:`q` held constant.

    Args:
        n_groups: Number of groups ``G``.
        step_size: :math:`\eta_q` of the exponentiated-gradient update.
        adjustment: Generalisation adjustment :math:`C` (a scalar or ``G`` values); needs
            ``group_counts``.
        group_counts: Training-set size of each group (``G`` positive values).
        criterion: As in :class:`~optlayers.layers.dro.DROLoss` (default: ``forward(losses)``
            or cross-entropy for ``forward(logits, target)``).
        process_group: ``None``, ``"world"`` or a ``ProcessGroup`` (see module doc).

    Example:
        >>> import torch
        >>> from optlayers.layers.dro import GroupDROLoss
        >>> loss_fn = GroupDROLoss(2, step_size=0.1)
        >>> losses = torch.tensor([1.0, 1.0, 3.0])
        >>> loss = loss_fn(losses, group_ids=torch.tensor([0, 0, 1]))
        >>> bool(loss_fn.q[1] > loss_fn.q[0])
        True
        >>> q = torch.softmax(0.1 * torch.tensor([1.0, 3.0]), 0)  # from uniform, group means 1 and 3
        >>> torch.allclose(loss_fn.q.float(), q), torch.isclose(loss, q @ torch.tensor([1.0, 3.0]))
        (True, tensor(True))
    """

    q: Tensor
    adjust: Tensor
    group_losses: Tensor

    def __init__(self, n_groups: int, step_size: float = 0.01, *,
                 adjustment: float | Sequence[float] | Tensor = 0.0,
                 group_counts: Sequence[float] | Tensor | None = None,
                 criterion: Criterion | None = None, process_group: Any = None) -> None:
        super().__init__()
        if int(n_groups) < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if not step_size >= 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        self.n_groups = int(n_groups)
        self.step_size = float(step_size)
        self.criterion = criterion
        self.process_group = process_group
        c = torch.as_tensor(adjustment, dtype=torch.float64).reshape(-1)
        if c.numel() == 1:
            c = c.expand(self.n_groups).clone()
        if c.numel() != self.n_groups:
            raise ValueError(f"adjustment must be a scalar or have {self.n_groups} values, got {c.numel()}")
        if bool((c != 0).any()):
            if group_counts is None:
                raise ValueError("a nonzero adjustment C needs group_counts (training-set size of each group)")
            counts = torch.as_tensor(group_counts, dtype=torch.float64).reshape(-1)
            if counts.numel() != self.n_groups or bool((counts <= 0).any()):
                raise ValueError(f"group_counts must have {self.n_groups} positive values")
            adj = c / counts.sqrt()
        else:
            adj = torch.zeros(self.n_groups, dtype=torch.float64)
        self.register_buffer("q", torch.full((self.n_groups,), 1.0 / self.n_groups, dtype=torch.float64))
        self.register_buffer("adjust", adj)
        self.register_buffer("group_losses", torch.zeros(self.n_groups, dtype=torch.float64), persistent=False)

    def extra_repr(self) -> str:
        return f"n_groups={self.n_groups}, step_size={self.step_size}"

    def forward(self, *inputs: Tensor, group_ids: Tensor) -> Tensor:
        """Robust loss :math:`\\sum_g q_g \\hat L_g` (updates ``q`` first in training mode)."""
        losses = per_example_losses(inputs, self.criterion).reshape(-1)
        g = torch.as_tensor(group_ids, device=losses.device).reshape(-1)
        if g.dtype.is_floating_point or g.dtype == torch.bool:
            raise TypeError("group_ids must be an integer tensor")
        if g.numel() != losses.numel():
            raise ValueError(f"group_ids has {g.numel()} entries for {losses.numel()} losses")
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.n_groups):
            raise ValueError(f"group_ids must lie in [0, {self.n_groups}), got range "
                             f"[{int(g.min())}, {int(g.max())}]")
        g = g.to(torch.int64)
        G = self.n_groups
        sums = torch.zeros(G, dtype=losses.dtype, device=losses.device).index_add(0, g, losses)
        counts = torch.bincount(g, minlength=G).to(torch.float64)
        distributed = self.process_group is not None and is_distributed()
        group = resolve_group(self.process_group) if distributed else None
        if distributed:
            packed = all_reduce_sum(torch.cat([sums.detach().to(torch.float64), counts]), group=group)
            g_sums, g_counts = packed[:G], packed[G:]
        else:
            g_sums, g_counts = sums.detach().to(torch.float64), counts
        present = g_counts > 0
        means = torch.where(present, g_sums / g_counts.clamp(min=1.0), torch.zeros_like(g_sums))
        self.group_losses = means.to(self.group_losses.device)
        if self.training and self.step_size > 0:
            with torch.no_grad():
                q = self.q.to(means.device)
                logq = torch.log(q) + torch.where(present, self.step_size * (means + self.adjust.to(means.device)),
                                                  torch.zeros_like(means))
                self.q.copy_(torch.softmax(logq, 0).to(self.q.device))
        q = self.q.to(device=losses.device, dtype=losses.dtype)
        denom = g_counts.clamp(min=1.0).to(device=losses.device, dtype=losses.dtype)
        local = (q * sums / denom).sum()
        if not distributed:
            return local
        local = world_size(group) * local
        value = (self.q.to(torch.float64) * means).sum().to(losses.dtype)
        return local - local.detach() + value

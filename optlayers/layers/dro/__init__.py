"""Distributionally robust losses: ``DROLoss`` (any uncertainty set, DDP over the global batch),
``GroupDROLoss``, ``LDRLoss``, Wasserstein losses, the ``Prospect`` optimizer and
``dr_dpo_loss``."""

from .dro_loss import DROLoss
from .group_dro import GroupDROLoss

__all__ = ["DROLoss", "GroupDROLoss"]

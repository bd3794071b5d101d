"""Distributionally robust losses: ``DROLoss`` (any uncertainty set of
:mod:`optlayers.solvers.dro`, DDP over the global batch), ``GroupDROLoss``, ``LDRLoss``,
Wasserstein losses, the ``Prospect`` optimizer and ``dr_dpo_loss``."""

from .dr_dpo import dpo_losses, dr_dpo_loss
from .dro_loss import DROLoss
from .group_dro import GroupDROLoss
from .ldr import LDRLoss, ldr_loss
from .prospect import Prospect
from .wasserstein import (
    WassersteinAux,
    WassersteinLinearLoss,
    WassersteinPenaltyLoss,
    wasserstein_certificate,
    wasserstein_linear_risk,
)

__all__ = [
    "DROLoss",
    "GroupDROLoss",
    "LDRLoss",
    "ldr_loss",
    "WassersteinPenaltyLoss",
    "WassersteinAux",
    "wasserstein_certificate",
    "WassersteinLinearLoss",
    "wasserstein_linear_risk",
    "Prospect",
    "dr_dpo_loss",
    "dpo_losses",
]

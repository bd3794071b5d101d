r"""Dr. DPO: distributionally robustifying DPO (Wu et al., arXiv:2407.07880).

With the per-pair DPO losses
:math:`\ell_i = -\log\sigma\big(\beta[(\log\pi_\theta(y_w|x) - \log\pi_{\mathrm{ref}}(y_w|x))
- (\log\pi_\theta(y_l|x) - \log\pi_{\mathrm{ref}}(y_l|x))]\big)`, Dr. DPO minimises

.. math:: \mathcal L = -\beta'\log\frac1n\sum_i e^{-\ell_i/\beta'}
          = \min_{p\in\Delta_n}\langle p,\ell\rangle + \beta'\,\mathrm{KL}(p\|u),

the *optimistic* (sign-flipped) KL penalty, :class:`~optlayers.solvers.dro.KLPenalty` with
``optimistic=True``: its weights :math:`\propto e^{-\ell_i/\beta'}` down-weight high-loss
(likely mislabelled) pairs. Computed with ``logsumexp`` (the reference
``log(mean(exp(-l / beta')))`` underflows for large losses or small :math:`\beta'`), and over the
global batch under DDP when ``process_group`` is given (the reference applies it per rank).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ...solvers.dro import KLPenalty
from .dro_loss import DROLoss

__all__ = ["dpo_losses", "dr_dpo_loss"]


def dpo_losses(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
               reference_rejected_logps: Tensor, *, beta: float = 0.1) -> Tensor:
    """Per-pair DPO losses :math:`-\\log\\sigma(\\beta\\,\\text{margin})` (shape of the inputs)."""
    margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * margin)


def dr_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor, *, beta: float = 0.1, beta_prime: float = 1.0,
                process_group: Any = None) -> Tensor:
    """Dr. DPO loss over the last dimension (the batch of preference pairs).

    Args:
        policy_chosen_logps, policy_rejected_logps: Policy log-probabilities, shape ``(..., n)``.
        reference_chosen_logps, reference_rejected_logps: Reference-model log-probabilities.
        beta: DPO temperature :math:`\\beta`.
        beta_prime: Robustness temperature :math:`\\beta' > 0` (large: plain DPO mean).
        process_group: ``None``, ``"world"`` or a ``ProcessGroup`` for the global batch.

    Returns:
        The scalar (per leading batch element) loss, differentiable w.r.t. the policy log-probs.
    """
    losses = dpo_losses(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=beta)
    return DROLoss(KLPenalty(beta_prime, optimistic=True), process_group=process_group)(losses)

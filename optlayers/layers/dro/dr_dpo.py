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
    r"""Per-pair DPO losses :math:`-\log\sigma(\beta\,\text{margin})` (shape of the inputs).

    .. math:: \text{margin} = \big(\log\pi_\theta(y_w|x) - \log\pi_{\mathrm{ref}}(y_w|x)\big)
              - \big(\log\pi_\theta(y_l|x) - \log\pi_{\mathrm{ref}}(y_l|x)\big).

    Example:
        A pair the policy ranks like the reference has margin 0 and loss :math:`\log 2`:

        >>> import torch
        >>> from optlayers.layers.dro import dpo_losses
        >>> chosen = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        >>> rejected = torch.tensor([-2.0, -12.0], dtype=torch.float64)
        >>> ref_chosen = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        >>> ref_rejected = torch.tensor([-2.0, -2.0], dtype=torch.float64)
        >>> [round(v, 4) for v in dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).tolist()]
        [0.6931, 0.3133]
    """
    margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * margin)


def dr_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor, *, beta: float = 0.1, beta_prime: float = 1.0,
                process_group: Any = None) -> Tensor:
    r"""Dr. DPO loss over the last dimension (the batch of preference pairs).

    It is :math:`-\beta'\log\frac1n\sum_i e^{-\ell_i/\beta'}` of the DPO losses
    :math:`\ell_i` (:func:`dpo_losses`), at most their mean, and tends to it as
    :math:`\beta'\to\infty`; its gradient weights pair :math:`i` by
    :math:`\mathrm{softmax}(-\ell/\beta')_i`.

    Args:
        policy_chosen_logps, policy_rejected_logps: Policy log-probabilities, shape ``(..., n)``.
        reference_chosen_logps, reference_rejected_logps: Reference-model log-probabilities.
        beta: DPO temperature :math:`\beta`.
        beta_prime: Robustness temperature :math:`\beta' > 0` (large: plain DPO mean).
        process_group: ``None``, ``"world"`` or a ``ProcessGroup`` for the global batch.

    Returns:
        The scalar (per leading batch element) loss, differentiable w.r.t. the policy log-probs.

    Example:
        >>> import math
        >>> import torch
        >>> from optlayers.layers.dro import dpo_losses, dr_dpo_loss
        >>> g = torch.Generator().manual_seed(0)
        >>> chosen, rejected, ref_chosen, ref_rejected = -torch.rand(4, 8, generator=g, dtype=torch.float64) * 10
        >>> losses = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
        >>> loss = dr_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, beta_prime=0.5)
        >>> torch.isclose(loss, -0.5 * (torch.logsumexp(-losses / 0.5, 0) - math.log(8)))
        tensor(True)
        >>> bool(loss < losses.mean())
        True
        >>> big = dr_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, beta_prime=1e6)
        >>> torch.isclose(big, losses.mean())
        tensor(True)
    """
    losses = dpo_losses(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=beta)
    return DROLoss(KLPenalty(beta_prime, optimistic=True), process_group=process_group)(losses)

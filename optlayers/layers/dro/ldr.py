r"""Label-distributionally robust (LDR) losses (Zhu, Ying & Yang, ICML 2023).

For logits :math:`z\in\mathbb R^K` and label :math:`y`, the LDR-KL loss is a KL-penalised worst
case over *label* distributions:

.. math:: \ell_\lambda(z, y) = \max_{p\in\Delta_K} \sum_k p_k\big(z_k - z_y + c\,[k\ne y]\big)
          - \lambda\,\mathrm{KL}(p\,\|\,\tfrac1K)
          = \lambda\Big(\log\sum_k e^{(z_k - z_y + c[k\ne y])/\lambda} - \log K\Big),

i.e. :class:`~optlayers.solvers.dro.KLPenalty` over classes; its gradient w.r.t. the logits is
:math:`p^\star - e_y` (Danskin). :math:`\lambda\to0` gives the Crammer–Singer hinge; ``c = 0``,
:math:`\lambda = 1` gives cross-entropy minus :math:`\log K`.

The adaptive variant (ALDR-KL) keeps one :math:`\lambda_i` per training example (indexed by the
dataset index passed as ``index=``) and updates it in closed form,
:math:`\lambda_i \leftarrow \lambda_0\big(1 - \mathrm{KL}(p^\star\|u)/(\alpha\log K)\big)`, adding
:math:`-\frac{\alpha\log K}{2\lambda_0}(\lambda_i - \lambda_0)^2`.

As in the authors' code, ``normalize_logits=True`` first maps the logits through softplus and
divides by their mean over classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ldr_loss", "LDRLoss"]


def _prep(logits: Tensor, normalize: bool) -> Tensor:
    if not normalize:
        return logits
    z = F.softplus(logits)
    return z / z.mean(-1, keepdim=True)


def _diff(z: Tensor, target: Tensor, margin: float) -> Tensor:
    onehot = F.one_hot(target, z.shape[-1]).to(z.dtype)
    zy = (z * onehot).sum(-1, keepdim=True)
    return z - zy + margin * (1.0 - onehot)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def ldr_loss(logits: Tensor, target: Tensor, *, lam: float | Tensor = 1.0, margin: float = 1.0,
             normalize_logits: bool = True, reduction: str = "mean") -> Tensor:
    r"""LDR-KL loss (see module doc). ``logits``: ``(N, K)``; ``target``: ``(N,)`` class indices;
    ``lam`` a positive scalar or ``(N,)`` per-example values.

    Per example, with :math:`z` the (optionally normalised) logits,

    .. math:: \ell_\lambda(z, y) = \lambda\Big(\log\sum_k e^{(z_k - z_y + c\,[k\ne y])/\lambda}
              - \log K\Big),

    then reduced over the batch by ``reduction``.

    Example:
        With ``margin=0``, ``lam=1`` and raw logits it is cross-entropy minus :math:`\log K`; a
        small ``lam`` approaches the Crammer–Singer hinge
        :math:`\max(0, \max_{k\ne y} z_k - z_y + c)`:

        >>> import math
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from optlayers.layers.dro import ldr_loss
        >>> logits = torch.tensor([[2.0, 1.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
        >>> target = torch.tensor([0, 1])
        >>> loss = ldr_loss(logits, target, lam=1.0, margin=0.0, normalize_logits=False, reduction="none")
        >>> torch.allclose(loss, F.cross_entropy(logits, target, reduction="none") - math.log(3))
        True
        >>> hinge = ldr_loss(logits, target, lam=1e-3, normalize_logits=False, reduction="none")
        >>> [round(v, 2) for v in hinge.tolist()]
        [0.5, 3.0]
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    lam_t = torch.as_tensor(lam, dtype=logits.dtype, device=logits.device)
    if bool((lam_t <= 0).any()):
        raise ValueError("lam must be positive")
    lam_t = lam_t.reshape(-1, 1) if lam_t.dim() else lam_t
    K = logits.shape[-1]
    d = _diff(_prep(logits, normalize_logits), target, margin)
    loss = (lam_t * (torch.logsumexp(d / lam_t, dim=-1, keepdim=True) - math.log(K))).squeeze(-1)
    return _reduce(loss, reduction)


class LDRLoss(nn.Module):
    r"""LDR-KL loss, optionally adaptive (ALDR-KL) with one :math:`\lambda_i` per example.

    Per example (see :func:`ldr_loss`), adaptive or not,

    .. math:: \lambda_i\Big(\log\sum_k e^{(z_k - z_y + c[k\ne y])/\lambda_i} - \log K\Big)
              - \frac{\alpha\log K}{2\lambda_0}(\lambda_i - \lambda_0)^2,

    with :math:`\lambda_i = \lambda_0` when not adaptive, and in training mode the adaptive
    update :math:`\lambda_i \leftarrow \lambda_0(1 - \mathrm{KL}(p^\star\|u)/(\alpha\log K))`
    first.

    Args:
        lam: :math:`\lambda_0 > 0`.
        margin: Margin ``c`` for the wrong classes.
        adaptive: Use per-example :math:`\lambda_i` (needs ``n_examples`` and ``index=``).
        n_examples: Training-set size (adaptive only).
        alpha: :math:`\alpha > 1` of the adaptive update.
        normalize_logits: Softplus + mean normalisation as in the reference code.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from optlayers.layers.dro import LDRLoss
        >>> from optlayers.layers.dro import ldr_loss
        >>> logits, target = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        >>> torch.equal(LDRLoss(lam=1.0)(logits, target), ldr_loss(logits, target, lam=1.0))
        True
        >>> adaptive = LDRLoss(lam=1.0, adaptive=True, n_examples=10)
        >>> loss = adaptive(logits, target, index=torch.tensor([0, 1, 2, 3]))
        >>> bool((adaptive.lams[:4] < 1.0).all()), bool((adaptive.lams[4:] == 1.0).all())
        (True, True)
    """

    lams: Tensor

    def __init__(self, lam: float = 1.0, margin: float = 1.0, *, adaptive: bool = False,
                 n_examples: int | None = None, alpha: float = 2.0, normalize_logits: bool = True,
                 reduction: str = "mean") -> None:
        super().__init__()
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam = float(lam)
        self.margin = float(margin)
        self.adaptive = bool(adaptive)
        self.alpha = float(alpha)
        self.normalize_logits = bool(normalize_logits)
        self.reduction = reduction
        _reduce(torch.zeros(1), reduction)  # validate
        if self.adaptive:
            if n_examples is None or int(n_examples) < 1:
                raise ValueError("adaptive LDR needs n_examples (the training-set size)")
            if not self.alpha > 1.0:
                raise ValueError(f"alpha must be > 1 for the adaptive update, got {alpha}")
            self.register_buffer("lams", torch.full((int(n_examples),), self.lam, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"lam={self.lam}, margin={self.margin}, adaptive={self.adaptive}"

    def forward(self, logits: Tensor, target: Tensor, index: Tensor | None = None) -> Tensor:
        if not self.adaptive:
            return ldr_loss(logits, target, lam=self.lam, margin=self.margin,
                            normalize_logits=self.normalize_logits, reduction=self.reduction)
        if index is None:
            raise ValueError("adaptive LDRLoss needs index= (dataset indices of the batch)")
        idx = index.to(self.lams.device).reshape(-1).long()
        K = logits.shape[-1]
        logK = math.log(K)
        d = _diff(_prep(logits, self.normalize_logits), target, self.margin)
        if self.training:
            with torch.no_grad():
                lam_old = self.lams[idx].to(d.dtype).to(d.device)
                p = torch.softmax(d / lam_old[:, None], dim=-1)
                kl = torch.special.xlogy(p, p * K).sum(-1)
                new = self.lam * (1.0 - kl / (self.alpha * logK))
                self.lams[idx] = new.clamp(min=1e-3 * self.lam).to(self.lams)
        lam_i = self.lams[idx].to(dtype=d.dtype, device=d.device)
        loss = lam_i * (torch.logsumexp(d / lam_i[:, None], dim=-1) - logK)
        loss = loss - 0.5 * self.alpha * logK / self.lam * (lam_i - self.lam) ** 2
        return _reduce(loss, self.reduction)

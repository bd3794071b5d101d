r"""``DROLoss``: a distributionally robust loss module, DDP-correct over the global batch.

.. math:: R(\ell) = \max_{p \in \mathcal U} \langle p, \ell\rangle - \lambda D(p),
          \qquad \nabla_\theta R = \sum_i p^\star_i \nabla_\theta \ell_i \quad\text{(Danskin)}

for an uncertainty set :math:`\mathcal U` given by a spec of :mod:`optlayers.solvers.dro`.
The weights :math:`p^\star` come from :func:`~optlayers.solvers.dro.robust_weights` on the
detached losses; the returned value carries the Danskin gradient.

Distributed data parallel (``process_group=``): the weights are computed over the *global*
batch, as if one process saw all of it:

1. the detached per-example losses are all-gathered (local sizes may differ);
2. every rank computes :math:`p^\star` on the same gathered vector (deterministic solvers,
   stable sorts, tied losses share weight), so no broadcast is needed;
3. the local slice is backpropagated as :math:`W\sum_{i\in\text{local}} p^\star_i\ell_i`
   (``W`` = world size), because DDP *averages* gradients over ranks.

The returned tensor's value is the global robust value on every rank. Two ranks with batch
``B`` thus give the gradient of one process with batch ``2B``; without ``process_group`` each
rank would use its own local worst case (a different objective).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..._result import Result
from ...distributed import all_gather_with_sizes, is_distributed, local_offset, rank, resolve_group, world_size
from ...kernels import Backend
from ...solvers.dro import DROSpec, robust_weights
from ...solvers.dro.fused import FusedRunner, fused_robust_value
from ...solvers.dro.robust_weights import DROAux

__all__ = ["DROLoss", "per_example_losses"]

Criterion = Callable[..., Tensor]


def per_example_losses(inputs: tuple[Tensor, ...], criterion: Criterion | None) -> Tensor:
    """Per-example losses from ``(losses,)`` or ``(input, target)`` (default: cross-entropy)."""
    if len(inputs) == 1 and criterion is None:
        return inputs[0]
    if criterion is None:
        if len(inputs) != 2:
            raise TypeError("pass either per-example losses, or (input, target) for the criterion")
        return F.cross_entropy(inputs[0], inputs[1], reduction="none")
    out = criterion(*inputs)
    if not isinstance(out, Tensor) or out.dim() == 0:
        raise ValueError("the criterion must return per-example losses (use reduction='none')")
    return out


class DROLoss(nn.Module):
    r"""Distributionally robust loss over the last dimension of per-example losses.

    For per-example losses :math:`\ell_i(\theta)` it returns

    .. math:: R(\ell) = \max_{p \in \mathcal U} \langle p, \ell\rangle - \lambda D(p),
              \qquad \nabla_\theta R = \sum_i p^\star_i \nabla_\theta \ell_i,

    with :math:`\mathcal U`, :math:`\lambda D` given by ``spec`` and :math:`p^\star` the
    maximiser (:func:`~optlayers.solvers.dro.robust_weights`).

    Args:
        spec: Uncertainty set (``CVaR(0.1)``, ``ChiSquareBall(1.0)``, ``KLPenalty(0.5)``, ...).
        criterion: Maps ``forward``'s inputs to per-example losses. Default: ``forward(losses)``
            takes the losses themselves, and ``forward(logits, target)`` uses
            ``cross_entropy(reduction="none")``.
        process_group: ``None`` (local batch), ``"world"`` (the default group) or a
            ``ProcessGroup``: compute the weights over the global batch (see module doc). The
            gradient scaling assumes DDP averages over the same group.
        tol, max_iter, backend, throw: Passed to
            :func:`~optlayers.solvers.dro.robust_weights`.
        warm_start: Start the 1-D root-finds (KL ball, Cressie–Read, holistic robustness) of a
            call at the root of the previous call with the same batch shape (kept on the module,
            not in the ``state_dict``). The stopping test is unchanged, so results agree with a
            cold start to ``tol``; successive training batches have close roots, so this saves
            most of the search.

    Speed: for CPU losses (at most 64 rows; under DDP the gathered losses) the weights and value
    come from the fused Numba solvers of :mod:`optlayers.solvers.dro.fused` — the same algorithms
    in one compiled call — unless a non-Numba backend is requested; everything else (and any case the
    fast path declines: non-finite losses, a root-find that did not converge) goes through
    :func:`~optlayers.solvers.dro.robust_weights`.

    Transforms: ``torch.func.grad``, ``jacrev``, ``jacfwd``, ``vmap`` (e.g. over an ensemble's
    losses) and forward-mode AD work, through :func:`~optlayers.solvers.dro.robust_weights`,
    and give the Danskin derivative.

    Example:
        >>> import torch
        >>> from optlayers.layers.dro import DROLoss
        >>> from optlayers.solvers.dro import CVaR
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
        >>> DROLoss(CVaR(0.5))(losses).backward()
        >>> losses.grad.tolist()
        [0.0, 0.0, 0.5, 0.5]
    """

    def __init__(self, spec: DROSpec, *, criterion: Criterion | None = None, process_group: Any = None,
                 tol: float | None = None, max_iter: int = 100, backend: Backend | str | None = None,
                 throw: bool = True, warm_start: bool = True) -> None:
        super().__init__()
        if not isinstance(spec, DROSpec):
            raise TypeError(f"spec must be a DRO spec (e.g. CVaR(0.1)), got {type(spec).__name__}")
        self.spec = spec
        self.criterion = criterion
        self.process_group = process_group
        self.tol = tol
        self.max_iter = int(max_iter)
        self.backend = backend
        self.throw = bool(throw)
        self.warm_start = bool(warm_start)
        self._warm: dict[str, Any] = {}
        self._runner: FusedRunner | None = None

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}" + ("" if self.process_group is None else ", distributed")

    def _distributed(self) -> bool:
        return self.process_group is not None and is_distributed()

    def solve(self, *inputs: Tensor) -> Result[DROAux]:
        """The full :class:`~optlayers.Result` (over the global batch when distributed; its
        value then carries no gradient — use ``forward`` for training)."""
        losses = per_example_losses(inputs, self.criterion)
        if self._distributed():
            losses, _ = all_gather_with_sizes(losses, dim=-1, group=self.process_group)
        return robust_weights(losses, self.spec, tol=self.tol, max_iter=self.max_iter, backend=self.backend,
                              throw=self.throw)

    def forward(self, *inputs: Tensor) -> Tensor:
        """Robust value (batch shape of the losses without the last dimension)."""
        losses = inputs[0] if len(inputs) == 1 and self.criterion is None else per_example_losses(
            inputs, self.criterion)
        if self.process_group is None or not is_distributed():
            run = self._runner
            if run is None or run.spec is not self.spec or not run.matches(losses):
                run = self._runner = FusedRunner.create(self.spec, losses, tol=self.tol, max_iter=self.max_iter,
                                                        backend=self.backend,
                                                        state=self._warm if self.warm_start else None)
            if run is not None:
                value = run(losses)
                if value is not None:
                    return value
            res = robust_weights(losses, self.spec, tol=self.tol, max_iter=self.max_iter, backend=self.backend,
                                 throw=self.throw)
            return res.aux.value
        group = resolve_group(self.process_group)
        gathered, sizes = all_gather_with_sizes(losses, dim=-1, group=group)
        # every rank solves the same gathered problem (deterministic: same weights everywhere)
        fast = fused_robust_value(gathered.detach(), self.spec, tol=self.tol, max_iter=self.max_iter,
                                  backend=self.backend, state=self._warm if self.warm_start else None)
        if fast is not None:
            value, p = fast[0].detach(), fast[1]
        else:
            res = robust_weights(gathered, self.spec, tol=self.tol, max_iter=self.max_iter, backend=self.backend,
                                 throw=self.throw)
            value, p = res.aux.value.detach(), res.solution
        start = local_offset(sizes, rank(group))
        p_local = p.narrow(-1, start, losses.shape[-1])
        local = world_size(group) * (p_local * losses).sum(-1)
        return local - local.detach() + value

r"""Mixture-of-experts routing by sparsity-constrained optimal transport.

Tokens (rows) are transported to experts (columns) with the cost ``C = −logits``: every token
carries mass 1 and every expert receives the same mass ``S/E`` (``S`` tokens and ``E`` experts per
group), so the load is balanced by construction rather than by an auxiliary loss. The plan

.. math::

    P = \operatorname*{arg\,min}_{P \ge 0,\ P1 = 1,\ P^\top 1 = (S/E) 1}
        -\langle \mathrm{logits}, P\rangle + \frac{\gamma}{2}\lVert P\rVert^2
        \quad\text{s.t.}\quad \lVert P_{:, e}\rVert_0 \le \mathrm{capacity}
        \ \ (\text{or } \lVert P_{s, :}\rVert_0 \le k)

(:func:`optlayers.solvers.sparse_ot.sparse_ot`, Liu, Puigcerver & Blondel, ICLR 2023) gives the
routing weights: with ``sparsity="expert"`` each expert takes at most ``capacity`` tokens and
receives exactly its share of the mass (the semi-dual meets the expert marginal exactly; tokens
may be partly routed, reported as the marginal violation); with ``sparsity="token"`` each token
goes to at most ``k`` experts and is routed in full, the expert loads being balanced through the
dual (the slots of an expert beyond its capacity are dropped, as in top-``k`` gating).

The outputs have the layout of GShard/Switch-Transformer MoE layers: ``dispatch`` and ``combine``
of shape ``(G, S, E, capacity)``, so ``expert_inputs = einsum("gsec,gsd->egcd", dispatch, x)`` and
``y = einsum("gsec,egcd->gsd", combine, expert_outputs)``. ``combine`` holds the plan entries
``P_se`` (the fraction of token ``s`` sent to expert ``e``) and is differentiable with respect to
the logits by implicit differentiation of the OT dual.

References:
    Liu, Puigcerver, Blondel. Sparsity-Constrained Optimal Transport. ICLR 2023.
    Lepikhin et al. GShard. ICLR 2021. Fedus, Zoph, Shazeer. Switch Transformers. JMLR 2022.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..._result import Result, register_aux
from ...implicit import MINRES, ImplicitAdjoint
from ...solvers.sparse_ot import DualAdam, DualLBFGS, SparseTransportPlan, sparse_ot

__all__ = ["sparse_ot_route", "topk_gating", "SparseOTRouter", "RoutingAux"]

_MODES = ("expert", "token")


@register_aux
@dataclasses.dataclass(frozen=True)
class RoutingAux:
    r"""Extras of :func:`sparse_ot_route` (leading dimensions: the groups).

    From the slot tensor :math:`D` (``dispatch``, ``(G, S, E, capacity)``) and the plan :math:`P`:

    .. math::

        \text{expert\_load}_e = \sum_{s, c} D_{sec}, \qquad
        \text{dropped} = \#\{s : \textstyle\sum_{e, c} D_{sec} = 0\}, \qquad
        \text{marginal\_violation} = \lVert P1 - 1\rVert_1 + \lVert P^\top 1 - \tfrac{S}{E}1\rVert_1 .

    Attributes:
        plan: The token-to-expert :class:`SparseTransportPlan` ``(G, S, E)``.
        logits: The router logits ``(G, S, E)``.
        expert_load: Tokens dispatched to each expert, ``(G, E)`` (after capacity).
        dropped: Tokens dispatched to no expert, ``(G,)``.
        marginal_violation: ``‖P1 − 1‖₁ + ‖Pᵀ1 − S/E‖₁`` per group.
        capacity: Slots per expert (int64, 0-d).

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 16, 4, dtype=torch.float64)
        >>> res = sparse_ot_route(logits, capacity=5)
        >>> dispatch, combine = res.solution
        >>> aux = res.aux
        >>> int(aux.capacity), torch.equal(aux.expert_load, dispatch.sum((1, 3)))
        (5, True)
        >>> bool((aux.expert_load <= aux.capacity).all()), tuple(aux.dropped.shape)
        (True, (2,))
        >>> torch.allclose(combine.sum(-1), aux.plan.to_dense())  # combine holds the plan entries
        True
    """

    plan: SparseTransportPlan
    logits: torch.Tensor
    expert_load: torch.Tensor
    dropped: torch.Tensor
    marginal_violation: torch.Tensor
    capacity: torch.Tensor


def _capacity(S: int, E: int, factor: float, k: int) -> int:
    return max(1, min(S, math.ceil(factor * k * S / E)))


def _slots_from_assignment(assign: torch.Tensor, weights: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch/combine ``(G, S, E, C)`` from a token-expert assignment mask, first come first served."""
    pos = torch.cumsum(assign.to(torch.int64), dim=1) - 1
    keep = assign & (pos < C)
    slot = torch.nn.functional.one_hot(pos.clamp(0, C - 1), C).to(weights.dtype)
    dispatch = slot * keep.unsqueeze(-1).to(weights.dtype)
    return dispatch, dispatch * weights.unsqueeze(-1)


def sparse_ot_route(logits: torch.Tensor, *, sparsity: str = "expert", capacity: int | None = None,
                    capacity_factor: float = 1.25, k: int = 1, gamma: float = 0.5,
                    formulation: str = "semi_dual", solver: DualLBFGS | DualAdam | str = "lbfgs",
                    tol: float | None = None, adjoint: ImplicitAdjoint | None = None,
                    throw: bool = True) -> Result[RoutingAux]:
    r"""Route tokens to experts by sparsity-constrained OT (see the module docstring).

    Per group, with ``S`` tokens and ``E`` experts, the plan is

    .. math::

        P = \operatorname*{arg\,min}_{P \ge 0,\ P1 = 1,\ P^\top 1 = (S/E)1}
            -\langle \mathrm{logits}, P\rangle + \frac{\gamma}{2}\lVert P\rVert^2
            \quad\text{s.t.}\quad \lVert P_{:, e}\rVert_0 \le \mathrm{capacity}\ \forall e
            \ \ (\text{or } \lVert P_{s, :}\rVert_0 \le k\ \forall s),

    and ``combine[s, e, c] = P_se`` at the slot ``c`` token ``s`` takes at expert ``e``
    (``dispatch`` is 1 there).

    Args:
        logits: Router scores ``(*groups, S, E)`` (higher is better); gradients flow to them.
        sparsity: ``"expert"`` (default: each expert takes at most ``capacity`` tokens) or
            ``"token"`` (each token goes to at most ``k`` experts).
        capacity: Slots per expert; None: ``ceil(capacity_factor · k · S / E)`` (``k = 1`` in
            ``"expert"`` mode), clipped to ``[1, S]``. ``"expert"`` mode needs
            ``capacity >= S/E`` for every token to be routable.
        capacity_factor: Slack over the average load ``S/E``.
        k: Experts per token in ``"token"`` mode.
        gamma: Quadratic regularization (logit units): larger spreads tokens over more experts.
        formulation, solver: As in :func:`~optlayers.solvers.sparse_ot.sparse_ot`.
        tol: L1 marginal tolerance; default ``1e-9 S`` (float64) / ``1e-5 S`` (float32).
        adjoint: Gradient configuration; None: ``ImplicitAdjoint(linear_solver=MINRES(),
            throw=throw)`` — with ``throw=False`` a failed adjoint solve (e.g. an inconsistent
            system at a loosely solved plan) gives MINRES's least-squares gradient instead of
            raising in backward.
        throw: Raise :class:`ConvergenceError` when a routing problem fails.

    Returns:
        :class:`Result` with ``solution = (dispatch, combine)``, each ``(*groups, S, E, capacity)``
        (``dispatch`` 0/1 in the dtype of ``logits``), flags per group, and :class:`RoutingAux`.

    Raises:
        ValueError: bad shapes or options.
        ConvergenceError: ``throw`` and a routing problem failed.

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 16, 4, dtype=torch.float64, requires_grad=True)
        >>> dispatch, combine = sparse_ot_route(logits, capacity=5).solution
        >>> tuple(combine.shape), bool((dispatch.sum((1, 3)) <= 5).all())
        ((2, 16, 4, 5), True)
        >>> torch.allclose(combine.sum((1, 3)), torch.full((2, 4), 16 / 4, dtype=torch.float64))  # Pᵀ1 = S/E
        True
        >>> (combine * torch.randn(2, 16, 4, 5, dtype=torch.float64)).sum().backward()
        >>> tuple(logits.grad.shape)
        (2, 16, 4)
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError("logits must be a floating tensor of shape (*groups, S, E)")
    if sparsity not in _MODES:
        raise ValueError(f"unknown sparsity {sparsity!r}; valid: {_MODES}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"capacity must be an int >= 1 or None, got {capacity!r}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor!r}")
    groups = tuple(logits.shape[:-2])
    S, E = logits.shape[-2], logits.shape[-1]
    G = math.prod(groups)
    lg = logits.reshape(G, S, E)
    C = capacity if capacity is not None else _capacity(S, E, capacity_factor, 1 if sparsity == "expert" else k)
    C = min(C, S)
    dtype = logits.dtype
    if tol is None:
        tol = (1e-9 if dtype == torch.float64 else 1e-5) * S
    a = torch.ones(G, S, dtype=dtype, device=logits.device)
    b = torch.full((G, E), S / E, dtype=dtype, device=logits.device)
    if adjoint is None:
        adjoint = ImplicitAdjoint(linear_solver=MINRES(), throw=throw)
    res = sparse_ot(a, b, -lg, k=C if sparsity == "expert" else k, gamma=gamma,
                    sparsity="column" if sparsity == "expert" else "row", formulation=formulation,
                    solver=solver, tol=tol, adjoint=adjoint, throw=throw)
    plan = res.aux.plan
    if sparsity == "expert":
        # the plan's compressed columns are the experts' slots
        idx, val = plan.indices, plan.values  # (G, E, w), w <= C
        w = idx.shape[-1]
        gi = torch.arange(G, device=idx.device)[:, None, None].expand_as(idx)
        ei = torch.arange(E, device=idx.device)[None, :, None].expand_as(idx)
        ci = torch.arange(w, device=idx.device)[None, None, :].expand_as(idx)
        where = (gi, idx, ei, ci)
        zeros = torch.zeros(G, S, E, C, dtype=dtype, device=logits.device)
        used = val > 0
        dispatch = zeros.index_put(where, used.to(dtype))
        combine = zeros.index_put(where, val)
        # loads and dropped tokens from the compact plan (not from the (G, S, E, C) tensors)
        load = used.sum(-1).to(dtype)
        hits = torch.zeros(G, S, dtype=torch.int64, device=idx.device)
        hits.scatter_add_(1, idx.reshape(G, -1), used.reshape(G, -1).to(torch.int64))
        dropped = (hits == 0).sum(-1)
    else:
        dense = plan.to_dense()  # (G, S, E)
        dispatch, combine = _slots_from_assignment(dense > 0, dense, C)
        load = dispatch.sum((1, 3))
        dropped = (dispatch.sum((2, 3)) == 0).sum(-1)
    aux = RoutingAux(plan=plan, logits=logits, expert_load=load.reshape(*groups, E), dropped=dropped.reshape(groups),
                     marginal_violation=res.aux.marginal_violation.reshape(groups),
                     capacity=torch.tensor(C, dtype=torch.int64))
    shape = (*groups, S, E, C)
    return Result((dispatch.reshape(shape), combine.reshape(shape)), res.converged.reshape(groups),
                  res.iterations.reshape(groups), res.residual.reshape(groups), res.status.reshape(groups), aux)


def topk_gating(logits: torch.Tensor, k: int = 1, *, capacity: int | None = None,
                capacity_factor: float = 1.25) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The top-``k`` softmax gating baseline (GShard/Switch) in the same layout.

    Each token picks its ``k`` highest-scoring experts; slots are given first come, first served
    (by token order) up to ``capacity`` per expert, overflow tokens are dropped; ``combine`` holds
    the softmax probabilities of the kept assignments:

    .. math::

        A_{se} = [e \in \operatorname{top}_k(\mathrm{logits}_s)], \quad
        c_{se} = \sum_{s' < s} A_{s'e}, \quad
        D_{sec} = A_{se} [c = c_{se} < \text{capacity}], \quad
        \text{combine}_{sec} = D_{sec}\, \operatorname{softmax}(\mathrm{logits}_s)_e .

    Args:
        logits: ``(*groups, S, E)``.
        k: Experts per token.
        capacity: Slots per expert; None: ``ceil(capacity_factor · k · S / E)``.
        capacity_factor: Slack over the average load.

    Returns:
        ``(dispatch, combine)``, each ``(*groups, S, E, capacity)``.

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 16, 4, dtype=torch.float64)
        >>> d, c = topk_gating(logits, k=1)
        >>> tuple(d.shape), bool((d.sum((2, 3)) <= 1).all()), bool((d.sum((1, 3)) <= 5).all())
        ((2, 16, 4, 5), True, True)
        >>> kept = d.sum(-1) > 0   # the top-1 expert of each token that found a slot
        >>> torch.equal(kept.nonzero()[:, 2], logits.argmax(-1)[kept.any(-1)])
        True
        >>> torch.allclose(c.sum(-1), torch.softmax(logits, -1) * d.sum(-1))
        True
    """
    groups = tuple(logits.shape[:-2])
    S, E = logits.shape[-2], logits.shape[-1]
    C = min(S, capacity if capacity is not None else _capacity(S, E, capacity_factor, k))
    lg = logits.reshape(-1, S, E)
    probs = torch.softmax(lg, dim=-1)
    top = torch.topk(lg, min(k, E), dim=-1).indices
    assign = torch.zeros_like(lg, dtype=torch.bool).scatter(-1, top, True)
    dispatch, combine = _slots_from_assignment(assign, probs, C)
    shape = (*groups, S, E, C)
    return dispatch.reshape(shape), combine.reshape(shape)


class SparseOTRouter(nn.Module):
    r"""Token-to-expert router by sparsity-constrained OT, batched over token groups.

    ``router(x)`` with ``x (*groups, S, d_model)`` returns ``(dispatch, combine)`` of shape
    ``(*groups, S, num_experts, capacity)``; :meth:`solve` returns the full :class:`Result`
    (flags per group, :class:`RoutingAux` with loads and the plan). The gate is a bias-free
    linear map ``logits = x Wᵀ``; its weight gets gradients through ``combine``:

    .. math::

        (\text{dispatch}, \text{combine}) = \text{sparse\_ot\_route}(x W^\top), \qquad
        \frac{\partial L}{\partial W} = \Big(\frac{\partial L}{\partial\, \mathrm{logits}}\Big)^{\!\top} x .

    Args:
        d_model: Token dimension.
        num_experts: ``E``.
        sparsity, capacity, capacity_factor, k, gamma, formulation, solver, tol, adjoint, throw: As in
            :func:`sparse_ot_route`.

    Example:
        >>> import torch
        >>> router = SparseOTRouter(8, 4, capacity_factor=1.25).double()
        >>> x = torch.randn(2, 16, 8, dtype=torch.float64)
        >>> dispatch, combine = router(x)
        >>> tuple(dispatch.shape), int(router.solve(x).aux.capacity)   # ceil(1.25 · 16 / 4) slots
        ((2, 16, 4, 5), 5)
        >>> (combine * torch.randn(2, 16, 4, 5, dtype=torch.float64)).sum().backward()
        >>> tuple(router.gate.weight.grad.shape)
        (4, 8)
    """

    def __init__(self, d_model: int, num_experts: int, *, sparsity: str = "expert", capacity: int | None = None,
                 capacity_factor: float = 1.25, k: int = 1, gamma: float = 0.5, formulation: str = "semi_dual",
                 solver: DualLBFGS | DualAdam | str = "lbfgs", tol: float | None = None,
                 adjoint: ImplicitAdjoint | None = None, throw: bool = True) -> None:
        super().__init__()
        if sparsity not in _MODES:
            raise ValueError(f"unknown sparsity {sparsity!r}; valid: {_MODES}")
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts = num_experts
        self.sparsity, self.capacity, self.capacity_factor, self.k = sparsity, capacity, capacity_factor, k
        self.gamma, self.formulation, self.solver, self.tol, self.throw = gamma, formulation, solver, tol, throw
        self.adjoint = adjoint

    def solve(self, x: torch.Tensor) -> Result[RoutingAux]:
        """The full routing :class:`Result` for tokens ``x (*groups, S, d_model)``."""
        return sparse_ot_route(self.gate(x), sparsity=self.sparsity, capacity=self.capacity,
                               capacity_factor=self.capacity_factor, k=self.k, gamma=self.gamma,
                               formulation=self.formulation, solver=self.solver, tol=self.tol,
                               adjoint=self.adjoint, throw=self.throw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dispatch, combine = self.solve(x).solution
        return dispatch, combine

    def extra_repr(self) -> str:
        return (f"d_model={self.gate.in_features}, num_experts={self.num_experts}, sparsity={self.sparsity!r}, "
                f"capacity={self.capacity}, capacity_factor={self.capacity_factor}, k={self.k}, gamma={self.gamma}")

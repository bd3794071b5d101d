"""The entropic transport plan as an operator, never materialized unless asked.

From dual potentials ``(f, g)``, weights ``(a, b)`` and temperature ``ε``,

.. math:: P_{ij} = a_i b_j \\exp\\big((f_i + g_j - C_{ij})/\\varepsilon\\big)

(for unbalanced problems the same formula holds with the unbalanced potentials). Every
operation streams over blocks of the geometry, so its memory is ``O((n + m) k)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree

from ...kernels.softmin_reference import block_rows
from .geometry import Geometry, _needs_autograd

__all__ = ["TransportPlan", "safe_log"]


def safe_log(w: torch.Tensor) -> torch.Tensor:
    """``log w`` with ``−inf`` where ``w = 0`` and a finite (zero) gradient there."""
    pos = w > 0
    return torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))),
                       torch.full_like(w, -math.inf))


def _block_cost(c: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor, i0: int,
                i1: int) -> torch.Tensor:
    p = torch.exp(alpha[:, i0:i1, None] + beta[:, None, :] - c / eps[:, None, None])
    return (p * c).sum((-1, -2))


def _streamed_cost(geo: Geometry, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                   differentiable: bool) -> torch.Tensor:
    B, n, m = geo.B, geo.n, geo.m
    src = geo.source(differentiable)
    rows = block_rows(B, n, m, geo.block_elements)
    total = torch.zeros(B, dtype=alpha.dtype, device=alpha.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        total = total + _block_cost(src.block(i0, i1), alpha, beta, eps, i0, i1)
    return total


class StreamedTransportCost(torch.autograd.Function):
    """``⟨C, P⟩ = Σ_ij C_ij e^{α_i + β_j − C_ij/ε}`` on an online geometry, backward block by block.

    Autograd through the streamed sum would keep every block of ``P`` for the backward (``n × m``
    numbers). Here the forward keeps nothing; the first backward recomputes one block at a time
    and differentiates it on the spot (``O(block)`` memory), for any cost. A differentiable
    backward (``create_graph``) differentiates the whole streamed sum instead (``O(n m)``; small
    problems). Used outside ``torch.func`` transforms only (under them the plain streamed sum is
    traced).

    Inputs ``(alpha (B, n), beta (B, m), eps (B,), geometry, *geometry tensors (flat batch))``.
    """

    @staticmethod
    def forward(alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor, geo: Geometry,  # type: ignore[override]
                *tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _streamed_cost(geo.rebuild(tensors), alpha, beta, eps, False)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        alpha, beta, eps, geo, *tensors = inputs
        ctx.geo = geo
        ctx.save_for_backward(alpha, beta, eps, *tensors)

    @staticmethod
    def backward(ctx: Any, w: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        alpha, beta, eps, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        prim = [alpha, beta, eps, *tensors]
        idx = [k for k in range(len(prim)) if needs[k if k < 3 else k + 1]]
        grads: list[Any] = [None] * len(prim)
        if torch.is_grad_enabled():  # differentiable backward: the whole streamed sum, traced
            def fn(*ps: torch.Tensor) -> torch.Tensor:
                full = list(prim)
                for k, p in zip(idx, ps):
                    full[k] = p
                return _streamed_cost(ctx.geo.rebuild(tuple(full[3:])), full[0], full[1], full[2], True)

            for k, g in zip(idx, torch.func.vjp(fn, *[prim[k] for k in idx])[1](w)):
                grads[k] = g
        else:
            geo = ctx.geo
            B, n, m = geo.B, geo.n, geo.m
            rows = block_rows(B, n, m, geo.block_elements)
            leaves = [p.detach().requires_grad_(k in idx) for k, p in enumerate(prim)]
            acc: list[torch.Tensor | None] = [None] * len(prim)
            with torch.enable_grad():
                src = geo.rebuild(tuple(leaves[3:])).source(True)
                for i0 in range(0, n, rows):
                    i1 = min(n, i0 + rows)
                    blk = _block_cost(src.block(i0, i1), leaves[0], leaves[1], leaves[2], i0, i1)
                    gs = torch.autograd.grad(blk, [leaves[k] for k in idx], w, allow_unused=True)
                    for k, g in zip(idx, gs):
                        prev = acc[k]
                        if g is not None:
                            acc[k] = g if prev is None else prev + g
            for k in idx:
                grads[k] = acc[k] if acc[k] is not None else torch.zeros_like(prim[k])
        return (grads[0], grads[1], grads[2], None, *grads[3:])


class TransportPlan:
    """A batch of transport plans ``P (*batch, n, m)`` given as an operator.

    Gradients flow through every method to the potentials, weights, ``ε`` and the geometry
    (exact derivatives of the plan need potentials from ``gradient=Implicit()`` or ``Unroll()``).

    Attributes:
        geometry: The :class:`Geometry`.
        f: ``(*batch, n)`` potentials; g: ``(*batch, m)``.
        a: ``(*batch, n)`` weights; b: ``(*batch, m)``.
        epsilon: ``(*batch,)`` temperatures.

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn
        >>> res = sinkhorn(None, None, torch.rand(4, 3, dtype=torch.float64), epsilon=0.1)
        >>> P = res.aux.plan
        >>> torch.allclose(P.to_dense().sum(-1), torch.full((4,), 0.25, dtype=torch.float64))
        True
    """

    def __init__(self, geometry: Geometry, f: torch.Tensor, g: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, epsilon: torch.Tensor) -> None:
        self.geometry = geometry
        self.f, self.g, self.a, self.b, self.epsilon = f, g, a, b, epsilon

    # ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.geometry.batch_shape, self.geometry.n, self.geometry.m)

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        geo = self.geometry
        B = geo.B
        eps = self.epsilon.reshape(B)
        alpha = self.f.reshape(B, geo.n) / eps[:, None] + safe_log(self.a.reshape(B, geo.n))
        beta = self.g.reshape(B, geo.m) / eps[:, None] + safe_log(self.b.reshape(B, geo.m))
        return alpha, beta, eps

    def _apply(self, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        geo = self.geometry.transpose() if transpose else self.geometry
        inner = geo.m
        batch = self.geometry.batch_shape
        vec = v.dim() == len(batch) + 1
        if v.shape[: len(batch)] != batch or v.shape[len(batch)] != inner:
            raise ValueError(f"expected a vector of shape {(*batch, inner)} or {(*batch, inner, 'k')}, "
                             f"got {tuple(v.shape)}")
        vv = v.reshape(self.geometry.B, inner, -1)
        alpha, beta, eps = self._flat()
        if transpose:
            alpha, beta = beta, alpha
        out = geo.kernel_apply(alpha, beta, eps, vv.to(alpha.dtype))
        return out.reshape(*batch, geo.n) if vec else out.reshape(*batch, geo.n, v.shape[-1])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v (*batch, m)`` or ``(*batch, m, k)``."""
        return self._apply(v, transpose=False)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``Pᵀ u`` for ``u (*batch, n)`` or ``(*batch, n, k)``."""
        return self._apply(u, transpose=True)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    @property
    def T(self) -> TransportPlan:
        """The transposed plan ``Pᵀ`` (an operator of shape ``(*batch, m, n)``)."""
        return TransportPlan(self.geometry.transpose(), self.g, self.f, self.b, self.a, self.epsilon)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row sums ``P 1`` and column sums ``Pᵀ 1``."""
        ones_m = torch.ones(*self.geometry.batch_shape, self.geometry.m, dtype=self.f.dtype,
                            device=self.f.device)
        ones_n = torch.ones(*self.geometry.batch_shape, self.geometry.n, dtype=self.f.dtype,
                            device=self.f.device)
        return self.matvec(ones_m), self.rmatvec(ones_n)

    def to_dense(self) -> torch.Tensor:
        """The plan as a ``(*batch, n, m)`` tensor. Only for small problems."""
        C = self.geometry.to_dense()
        batch = self.geometry.batch_shape
        alpha, beta, eps = self._flat()
        B, n, m = self.geometry.B, self.geometry.n, self.geometry.m
        logp = alpha[:, :, None] + beta[:, None, :] - C.reshape(B, n, m) / eps[:, None, None]
        return torch.exp(logp).reshape(*batch, n, m)

    @torch.no_grad()
    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest entries of each row, streamed over blocks (no gradient).

        Returns:
            ``(values, indices)``, each ``(*batch, n, k)``.
        """
        geo = self.geometry
        k = min(int(k), geo.m)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        alpha, beta, eps = self._flat()
        B, n, m = geo.B, geo.n, geo.m
        src = geo.source(False)
        rows = block_rows(B, n, m, geo.block_elements)
        vals, idxs = [], []
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            c = src.block(i0, i1)
            logp = alpha[:, i0:i1, None] + beta[:, None, :] - c / eps[:, None, None]
            v, i = torch.topk(logp, k, dim=-1)
            vals.append(v.exp())
            idxs.append(i)
        batch = geo.batch_shape
        return (torch.cat(vals, 1).reshape(*batch, n, k), torch.cat(idxs, 1).reshape(*batch, n, k))

    def transport_cost(self) -> torch.Tensor:
        """``⟨C, P⟩`` per problem, ``(*batch,)``, streamed over blocks."""
        geo = self.geometry
        alpha, beta, eps = self._flat()
        B = geo.B
        diff = _needs_autograd(alpha, beta, eps, *geo.tensors())
        if diff and geo.is_online and not torch._C._are_functorch_transforms_active():
            # online under autograd: nothing stored in the forward, the backward streams blocks
            flat = tuple(t.reshape(B, *t.shape[t.dim() - 2:]) for t in geo.tensors())
            total = StreamedTransportCost.apply(alpha, beta, eps, geo.rebuild(flat), *flat)
        else:
            total = _streamed_cost(geo, alpha, beta, eps, diff)
        return total.reshape(geo.batch_shape)

    def __repr__(self) -> str:
        return f"TransportPlan(shape={self.shape}, online={self.geometry.is_online})"


def _plan_flatten(p: TransportPlan) -> tuple[list[Any], Any]:
    return [p.geometry, p.f, p.g, p.a, p.b, p.epsilon], None


def _plan_unflatten(values: Any, context: Any) -> TransportPlan:
    return TransportPlan(*values)


pytree.register_pytree_node(TransportPlan, _plan_flatten, _plan_unflatten,
                            serialized_type_name="optlayers.solvers.ot.TransportPlan")

"""Differentiable soft-min on an online squared-Euclidean point cloud with a matrix-free backward.

For ``C_ij = s‖x_i − y_j‖²`` (never stored), ``h (B, m)`` and ``ε (B,)``,

.. math::
    S_i = \\operatorname{softmin}_\\varepsilon(C - h)_i = -\\varepsilon \\log \\sum_j
          e^{(h_j - C_{ij})/\\varepsilon},
    \\qquad \\pi_{ij} = e^{(h_j - C_{ij} + S_i)/\\varepsilon} \\quad (\\textstyle\\sum_j \\pi_{ij} = 1).

Its vector-Jacobian product with a cotangent ``u (B, n)`` is, with ``π`` applied as an operator
(:func:`optlayers.kernels.softmin.kernel_apply`, streamed over blocks, ``O((n + m) d)`` memory):

.. math::
    \\bar h = -\\pi^\\top u, \\qquad
    \\bar x_i = 2s\\,u_i\\big(x_i - (\\pi y)_i\\big), \\qquad
    \\bar y_j = 2s\\big(y_j (\\pi^\\top u)_j - (\\pi^\\top (u \\odot x))_j\\big), \\qquad
    \\bar\\varepsilon = \\sum_i u_i \\big(S_i + (\\pi h)_i - (\\pi C)_i\\big)/\\varepsilon,

with ``(πC)_i = s(‖x_i‖² − 2 x_i·(πy)_i + (π‖y‖²)_i)`` in centred coordinates. Autograd through
the blockwise reference instead would store every block of ``π`` for the backward, i.e. ``n × m``
numbers: this is what keeps the implicit (and unrolled) backward of Sinkhorn on an online
geometry linear in memory. Higher derivatives (a backward run with ``create_graph``, forward
mode, ``torch.func`` transforms differentiating the backward) use the differentiable blockwise
reference, whose memory is ``O(n m)``: they are meant for small problems.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...kernels import softmin as _kernels
from ...kernels.softmin_reference import SqEuclideanSource, softmin_reference

__all__ = ["OnlineSqEuclideanSoftmin", "online_softmin"]


def _reference(h: torch.Tensor, eps: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: float,
               block_elements: int | None) -> torch.Tensor:
    return softmin_reference(SqEuclideanSource(x, y, scale), h, eps, block_elements=block_elements)


@torch.no_grad()
def _vjp_matrix_free(u: torch.Tensor, S: torch.Tensor, h: torch.Tensor, eps: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, scale: float, block_elements: int | None,
                     needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    need_h, need_e, need_x, need_y = needs
    e = eps[:, None]
    center = 0.5 * (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True))
    xc, yc = x - center, y - center
    fin_s = torch.isfinite(S)
    alpha = torch.where(fin_s, S / e, torch.full_like(S, -math.inf))
    beta = h / e
    u = torch.where(fin_s, u, torch.zeros_like(u))
    gh = ge = gx = gy = None
    if need_x or need_e:
        hs = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
        v = torch.cat([yc, (yc * yc).sum(-1, keepdim=True), hs[..., None]], -1)
        out = _kernels.kernel_apply(SqEuclideanSource(x, y, scale), alpha, beta, eps, v,
                                    block_elements=block_elements)
        d = x.shape[-1]
        piy = out[..., :d]
        if need_x:
            gx = (2.0 * scale) * u[..., None] * (xc - piy)
        if need_e:
            piC = scale * ((xc * xc).sum(-1) - 2.0 * (xc * piy).sum(-1) + out[..., d])
            dS = torch.where(fin_s, (S + out[..., d + 1] - piC) / e, torch.zeros_like(S))
            ge = (u * dS).sum(-1)
    if need_h or need_y:
        v = torch.cat([u[..., None], u[..., None] * xc], -1)
        out_t = _kernels.kernel_apply(SqEuclideanSource(y, x, scale), beta, alpha, eps, v,
                                      block_elements=block_elements)
        pu = out_t[..., 0]
        if need_h:
            gh = -pu
        if need_y:
            gy = (2.0 * scale) * (yc * pu[..., None] - out_t[..., 1:])
    return gh, ge, gx, gy


class OnlineSqEuclideanSoftmin(torch.autograd.Function):
    """``S = softmin_ε(C − h)`` for ``C = s‖x − y‖²`` computed online; matrix-free first backward.

    Inputs ``(h (B, m), eps (B,), x (B, n, d), y (B, m, d), scale, block_elements)``; output
    ``(B, n)``. See the module docstring for the derivatives.
    """

    @staticmethod
    def forward(h: torch.Tensor, eps: torch.Tensor, x: torch.Tensor, y: torch.Tensor,  # type: ignore[override]
                scale: float, block_elements: int | None) -> torch.Tensor:
        with torch.no_grad():
            return _kernels.softmin(SqEuclideanSource(x, y, scale), h, eps, block_elements=block_elements)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        h, eps, x, y, scale, block_elements = inputs
        ctx.scale, ctx.block_elements = scale, block_elements
        ctx.save_for_backward(h, eps, x, y, output)
        ctx.save_for_forward(h, eps, x, y)

    @staticmethod
    def backward(ctx: Any, u: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        h, eps, x, y, S = ctx.saved_tensors
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:4])
        if torch.is_grad_enabled():
            # a differentiable backward was asked for (create_graph / nested transforms): the
            # blockwise reference, differentiated by torch.func (O(n m) memory; small problems)
            idx = [i for i, n in enumerate(needs) if n]
            prim = [h, eps, x, y]

            def fn(*ps: torch.Tensor) -> torch.Tensor:
                full = list(prim)
                for i, p in zip(idx, ps):
                    full[i] = p
                return _reference(*full, ctx.scale, ctx.block_elements)  # type: ignore[call-arg]

            vjp = torch.func.vjp(fn, *[prim[i] for i in idx])[1](u)
            grads: list[Any] = [None] * 4
            for i, g in zip(idx, vjp):
                grads[i] = g
            return (*grads, None, None)
        gh, ge, gx, gy = _vjp_matrix_free(u, S, h, eps, x, y, ctx.scale, ctx.block_elements, needs)  # type: ignore[arg-type]
        return gh, ge, gx, gy, None, None

    @staticmethod
    def jvp(ctx: Any, h_t: torch.Tensor | None, eps_t: torch.Tensor | None, x_t: torch.Tensor | None,
            y_t: torch.Tensor | None, *_: Any) -> torch.Tensor:
        h, eps, x, y = ctx.saved_tensors
        prim = (h, eps, x, y)
        tang = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(prim, (h_t, eps_t, x_t, y_t)))
        def fn(hh: torch.Tensor, ee: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return _reference(hh, ee, xx, yy, ctx.scale, ctx.block_elements)

        out: torch.Tensor = torch.func.jvp(fn, prim, tang)[1]
        return out

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], h: torch.Tensor, eps: torch.Tensor, x: torch.Tensor,
             y: torch.Tensor, scale: float, block_elements: int | None) -> tuple[torch.Tensor, int]:
        V = info.batch_size
        moved = []
        for t, d in zip((h, eps, x, y), in_dims[:4]):
            t = t.expand(V, *t.shape) if d is None else t.movedim(d, 0)
            moved.append(t.reshape(-1, *t.shape[2:]))
        out = OnlineSqEuclideanSoftmin.apply(*moved, scale, block_elements)
        return out.reshape(V, -1, out.shape[-1]), 0


def online_softmin(x: torch.Tensor, y: torch.Tensor, scale: float, h: torch.Tensor, eps: torch.Tensor,
                   block_elements: int | None = None) -> torch.Tensor:
    """Differentiable ``softmin_ε(C − h)`` over ``j`` for ``C = scale·‖x − y‖²`` (flat batch).

    Args:
        x: ``(B, n, d)``; y: ``(B, m, d)``.
        scale: Cost factor ``s``.
        h: ``(B, m)``; eps: ``(B,)``.
        block_elements: Entries per streamed block.

    Returns:
        ``(B, n)``; its first backward applies the soft-min weights as an operator.
    """
    out: torch.Tensor = OnlineSqEuclideanSoftmin.apply(h, eps, x, y, scale, block_elements)
    return out

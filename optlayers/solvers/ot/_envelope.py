"""Envelope (Danskin) value of entropic OT on squared-Euclidean point clouds in one fused pass.

At potentials ``(f, g)`` held fixed, with ``P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)``, the dual
objective of :mod:`.dual` is

.. math::
    D = \\Phi_a(f) + \\Phi_b(g) - \\varepsilon\\Big(\\sum_{ij} P_{ij} - \\textstyle\\sum_i a_i \\sum_j b_j\\Big),

and its partial derivatives (the envelope gradients of the OT value) are

.. math::
    \\partial_{x_i} D = \\sum_j P_{ij} \\nabla_x C(x_i, y_j) = 2s\\big(x_i (P\\mathbf 1)_i - (P y)_i\\big),
    \\qquad
    \\partial_{a_i} D = \\Phi_a'(f)_i - \\varepsilon\\Big(\\frac{(P\\mathbf 1)_i}{a_i} - \\textstyle\\sum_j b_j\\Big),

(the same for ``y``, ``b`` with ``Pᵀ``) and
``∂_ε D = −(ΣP − Σa Σb) + (⟨f, P1⟩ + ⟨P g, 1⟩ − ⟨C, P⟩)/ε``, for ``C = s‖x − y‖²``.

One streamed transport-apply ``P · [1, ỹ, ‖ỹ‖²]`` (``ỹ`` the centred points) gives the row sums
``P1`` (hence ``D``), ``P ỹ`` (the gradient in ``x``) and ``⟨C, P⟩``, all in the working dtype and
without storing ``C`` or ``P``; the gradient in ``y`` (or ``b``) costs one more pass with ``Pᵀ``,
run only when needed. The gradients are attached by the identity
``D + Σ_k (t_k − t_k.detach())`` with linear-in-the-input surrogates ``t_k`` whose gradients are the
partial derivatives above, so the value's graph holds ``O(n + m)`` numbers. Exact first
derivatives; a backward with ``create_graph=True`` raises (second derivatives of the OT value need
:class:`~optlayers.solvers.ot.Implicit`, as documented for :class:`~optlayers.solvers.ot.Envelope`).
"""

from __future__ import annotations

from typing import Any

import torch

from .geometry import Geometry, PointCloud, SqEuclidean
from .plan import safe_log

__all__ = ["envelope_value"]


def _dphi(pot: torch.Tensor, rho: float | None) -> torch.Tensor:
    """``∂Φ/∂w`` at fixed potential: ``pot`` (hard marginal) or ``−ρ(e^{−pot/ρ} − 1)``."""
    if rho is None:
        return pot
    return -rho * torch.expm1(-pot / rho)


def _phi(w: torch.Tensor, pot: torch.Tensor, rho: float | None) -> torch.Tensor:
    return (w * _dphi(pot, rho)).sum(-1)


def envelope_value(geom: Geometry, f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   eps: torch.Tensor, rho_a: float | None,
                   rho_b: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(value, transport_cost)`` on a flat batch with envelope gradients, or None if not covered.

    Covered: a :class:`PointCloud` with a :class:`SqEuclidean` cost, outside ``torch.func``
    transforms (the caller then uses the generic, autograd-traced :func:`.dual.dual_value`).
    ``f``, ``g`` are treated as constants; gradients flow to the points, ``a``, ``b`` and ``ε``.

    Args:
        geom: Flat geometry (batch ``B``).
        f: ``(B, n)``; g: ``(B, m)`` potentials (detached).
        a: ``(B, n)``; b: ``(B, m)`` weights.
        eps: ``(B,)``.
        rho_a, rho_b: KL marginal strengths (None: hard constraint).

    Returns:
        ``value (B,)`` (differentiable) and ``transport_cost (B,)`` (detached).
    """
    if (not isinstance(geom, PointCloud) or not isinstance(geom.cost, SqEuclidean)
            or torch._C._are_functorch_transforms_active()):
        return None
    grad_on = torch.is_grad_enabled()
    x, y = geom.x, geom.y
    need_x = grad_on and x.requires_grad
    need_y = grad_on and y.requires_grad
    need_a = grad_on and a.requires_grad
    need_b = grad_on and b.requires_grad
    need_e = grad_on and eps.requires_grad
    s = geom.cost.scale
    with torch.no_grad():
        f, g = f.detach(), g.detach()
        ad, bd, e = a.detach(), b.detach(), eps.detach()
        xd, yd = x.detach(), y.detach()
        center = 0.5 * (xd.mean(-2, keepdim=True) + yd.mean(-2, keepdim=True))
        xc, yc = xd - center, yd - center
        alpha = f / e[:, None] + safe_log(ad)
        beta = g / e[:, None] + safe_log(bd)
        d = x.shape[-1]
        cols = [torch.ones_like(yc[..., :1]), yc, (yc * yc).sum(-1, keepdim=True)]
        if need_e:
            cols.append(g[..., None])
        out = geom.kernel_apply(alpha, beta, e, torch.cat(cols, -1))  # (B, n, d + 2 [+ 1])
        r = out[..., 0]
        Py = out[..., 1:d + 1]
        mass = r.sum(-1)
        sa, sb = ad.sum(-1), bd.sum(-1)
        tcost = s * ((r * (xc * xc).sum(-1)).sum(-1) - 2.0 * (xc * Py).sum((-1, -2)) + out[..., d + 1].sum(-1))
        value = _phi(ad, f, rho_a) + _phi(bd, g, rho_b) - e * (mass - sa * sb)
        col = PtX = None
        if need_y or need_b:
            out_t = geom.transpose().kernel_apply(beta, alpha, e, torch.cat([torch.ones_like(xc[..., :1]), xc], -1))
            col, PtX = out_t[..., 0], out_t[..., 1:]
    terms: list[torch.Tensor] = []
    if need_x:
        xs = x - center
        terms.append(s * ((r * (xs * xs).sum(-1)).sum(-1) - 2.0 * (xs * Py).sum((-1, -2))))
    if need_y:
        assert col is not None and PtX is not None
        ys = y - center
        terms.append(s * ((col * (ys * ys).sum(-1)).sum(-1) - 2.0 * (ys * PtX).sum((-1, -2))))
    if need_a:
        with torch.no_grad():
            ratio = torch.where(ad > 0, r / torch.where(ad > 0, ad, torch.ones_like(ad)), torch.ones_like(ad))
            ga = _dphi(f, rho_a) - e[:, None] * (ratio - sb[:, None])
        terms.append((a * ga).sum(-1))
    if need_b:
        assert col is not None
        with torch.no_grad():
            ratio = torch.where(bd > 0, col / torch.where(bd > 0, bd, torch.ones_like(bd)), torch.zeros_like(bd))
            gb = _dphi(g, rho_b) - e[:, None] * (ratio - sa[:, None])
        terms.append((b * gb).sum(-1))
    if need_e:
        with torch.no_grad():
            Pg = out[..., d + 2].sum(-1)
            ge = -(mass - sa * sb) + ((f * r).sum(-1) + Pg - tcost) / e
        terms.append(eps * ge)
    for t in terms:
        value = value + (t - t.detach())
    if terms:
        value = _FirstOrderOnly.apply(value)
    return value, tcost


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses ``create_graph=True``: the surrogates above give exact first
    derivatives, but differentiating them again would return a silently wrong Hessian."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "second derivatives of an OT value computed with gradient=Envelope() are not its "
                "Hessian (the potentials are held fixed); pass gradient=Implicit() to sinkhorn / "
                "SinkhornLoss for double backward")
        return grad

"""Dual objective and optimality condition of entropic OT (used for values and gradients).

Dual (Séjourné et al., 2019; balanced when ``ρ = ∞``):

.. math::
    D(f, g) = \\Phi_a(f) + \\Phi_b(g)
              - \\varepsilon\\Big(\\sum_{ij} a_i b_j e^{(f_i + g_j - C_{ij})/\\varepsilon}
              - \\textstyle\\sum_i a_i \\sum_j b_j\\Big),

with ``Φ_a(f) = ⟨a, f⟩`` for a hard marginal and ``Φ_a(f) = −ρ_a ⟨a, e^{−f/ρ_a} − 1⟩`` for a
KL-relaxed one. The mass term is evaluated through the soft-min,
``Σ_ij a_i b_j e^{(f_i+g_j−C_ij)/ε} = Σ_i a_i e^{(f_i − S_i)/ε}`` with
``S = softmin_ε(C − g − ε log b)``, so it is one streamed reduction. At optimal potentials
``D`` equals the regularized OT value, and by Danskin's theorem its gradient with respect to
``(C, a, b, ε)`` at *fixed* potentials is the gradient of the value (``∂D/∂C = P``).

Optimality (for implicit differentiation), with the balanced gauge fixed by a rank-one term
that vanishes on the normalized solution ``⟨a, f⟩ = ⟨b, g⟩``:

.. math::
    F(f, g) = \\begin{pmatrix}
              f - \\lambda_a \\operatorname{softmin}_\\varepsilon(C - g - \\varepsilon\\log b) + s \\mathbf 1_n \\\\
              g - \\lambda_b \\operatorname{softmin}_\\varepsilon(C^\\top - f - \\varepsilon\\log a)
              - s \\mathbf 1_m \\end{pmatrix},
    \\qquad s = \\langle a, f\\rangle - \\langle b, g\\rangle \\ (\\text{balanced only}).

Its Jacobian is ``J + w (a, −b)ᵀ`` with ``w = (1_n, −1_m)``; the balanced
``J = [[I, A⁻¹P], [B⁻¹Pᵀ, I]]`` has right null vector ``(1, −1)`` (the gauge ``f + c, g − c``)
and left null vector ``(a, −b)``; since ``⟨(a, −b), w⟩ = Σa + Σb ≠ 0`` and
``⟨(a, −b), (1, −1)⟩ ≠ 0``, the rank-one term makes it nonsingular.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ...kernels.softmin_reference import block_rows
from .geometry import Geometry, _needs_autograd
from .plan import safe_log

__all__ = ["dual_value", "optimality", "row_softmin"]


def _block_lse(c_fn_inputs: tuple[torch.Tensor, ...], h: torch.Tensor, eps: torch.Tensor,
               geom: Geometry, i0: int, i1: int) -> torch.Tensor:
    src = geom.rebuild(c_fn_inputs).source(True)
    c = src.block(i0, i1)
    return -eps[:, None] * torch.logsumexp((h[:, None, :] - c) / eps[:, None, None], dim=-1)


def row_softmin(geom: Geometry, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``softmin`` over ``j``; with autograd on an online geometry each block is checkpointed.

    Checkpointing keeps the backward's memory at ``O(block · m)`` instead of ``O(n · m)``. An online
    squared-Euclidean cloud needs no checkpoint: its soft-min has a matrix-free backward.
    """
    if (geom.is_online and not geom.matrix_free_softmin and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()
            and _needs_autograd(h, eps, *geom.tensors())):
        B, n, m = geom.B, geom.n, geom.m
        rows = block_rows(B, n, m, geom.block_elements)
        outs = []
        flat = geom.rebuild(tuple(t for t in geom.tensors()))
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            outs.append(checkpoint(_block_lse, geom.tensors(), h, eps, flat, i0, i1, use_reentrant=False))
        return torch.cat(outs, dim=1)
    return geom.softmin(h, eps, axis=1)


def _phi(w: torch.Tensor, pot: torch.Tensor, rho: float | None) -> torch.Tensor:
    if rho is None:
        return (w * pot).sum(-1)
    return -rho * (w * torch.expm1(-pot / rho)).sum(-1)


def dual_value(geom: Geometry, f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               eps: torch.Tensor, rho_a: float | None, rho_b: float | None) -> torch.Tensor:
    """The dual objective ``D(f, g)`` on a flat batch; ``(B,)``. Differentiable in every input."""
    e = eps[:, None]
    S = row_softmin(geom, g + e * safe_log(b), eps)
    expo = torch.where(a > 0, (f - S) / e, torch.zeros_like(f))
    mass = (a * torch.exp(expo)).sum(-1)
    return _phi(a, f, rho_a) + _phi(b, g, rho_b) - eps * (mass - a.sum(-1) * b.sum(-1))


def optimality(geom: Geometry, f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               eps: torch.Tensor, rho_a: float | None,
               rho_b: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``F(f, g)`` above (zero at the gauge-normalized Sinkhorn fixed point)."""
    from ._iterations import lambdas

    e = eps[:, None]
    lam_a, lam_b = lambdas(rho_a, eps), lambdas(rho_b, eps)
    Ff = f - lam_a * geom.softmin(g + e * safe_log(b), eps, axis=1)
    Fg = g - lam_b * geom.softmin(f + e * safe_log(a), eps, axis=0)
    if rho_a is None and rho_b is None:
        s = ((a * f).sum(-1) - (b * g).sum(-1))[:, None]
        Ff = Ff + s
        Fg = Fg - s
    return Ff, Fg

r"""The (k-sparse) quadratically regularized OT *dual*: objective, optimality, plan.

Canonical problem as in :mod:`.semi_dual` (``K (B, m, n)`` holds the constrained columns as
rows). With ``Ω(t) = (γ/2)‖t‖² + ι{‖t‖₀ ≤ k}`` per column, whose conjugate is
``δ(x) = (1/2γ) Σ_{top-k} [x_i]_+²`` (Blondel et al. 2018, eq. 7; Liu et al. 2023), the dual is

.. math::

    D(\alpha, \beta) = \langle \alpha, a\rangle + \langle \beta, b\rangle
        - \sum_j \delta\big(\alpha + \beta_j \mathbf 1 - K_j\big),
    \qquad P_{ij} = [\alpha_i + \beta_j - K_{ji}]_+/\gamma \ \text{on the top-}k\ \text{of column } j,

with ``∇D = (a − P1, b − Pᵀ1)``. Both marginals are met only at a stationary point. When ``k``
binds, the dual is a looser relaxation than the semi-dual (``max_β D(α, β) <= S(α)``, since the
conjugate of the nonconvex ``Ω + ι{Σt = b}`` is at most the infimal form used here); otherwise the
two coincide, and equal the primal optimum. :func:`~optlayers.solvers.sparse_ot.sparse_ot` warm
starts the dual from the semi-dual solution ``(α, β = −γτ)``.

Optimality condition for implicit gradients: ``F(α, β) = (P1 − a + μ w 1, Pᵀ1 − b − μ w 1)``
with ``w = 1ᵀα − 1ᵀβ`` (fixing the invariance ``D(α + c, β − c) = D(α, β)``; solutions are
normalized to ``w = 0``). ``∂F`` is symmetric positive semidefinite (MINRES).
"""

from __future__ import annotations

import torch

from ...kernels import Backend, dispatch
from ...kernels.sparse_ot_dual import DUAL_KERNEL_NAME

__all__ = ["DualOracle", "dual_optimality", "dual_support", "dual_plan", "dual_value"]


class DualOracle:
    """Value and gradient of ``f = −D`` on flat tensors ``z = (α, β)`` of shape ``(B, n + m)``.

    The sums run in the fused ``"sparse_ot_dual_grad"`` kernel (one pass over ``K``; Numba on
    CPU, else PyTorch), which selects the top ``k`` only in columns with more than ``k`` positive
    entries.
    """

    def __init__(self, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, kk: int, *,
                 backend: Backend | str | None = None) -> None:
        self.K, self.a, self.b, self.gamma = K, a, b, gamma
        self.B, self.m, self.n = K.shape
        self.kk = kk
        self.fn = dispatch(DUAL_KERNEL_NAME, backend=backend, device=K.device, size=K.numel())

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        alpha, beta = z[:, :n], z[:, n:]
        gam = self.gamma[:, None]
        r_n, r_m, inner, binding = self.fn(alpha, beta, self.K, self.kk)
        g = torch.cat([r_n / gam - self.a, r_m / gam - self.b], dim=-1)
        # D = ⟨α, a − P1⟩ + ⟨β, b − Pᵀ1⟩ + ⟨P, K⟩ + (γ/2)‖P‖² (no cancellation near the optimum)
        D = -(z * g).sum(-1) + inner / self.gamma
        return -D, g, g.abs().sum(-1), binding


def dual_optimality(z: torch.Tensor, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    gamma: torch.Tensor, kk: int, mu: float) -> torch.Tensor:
    """``F(α, β)`` in PyTorch operations (differentiable, vmappable); ``z (..., n + m)``."""
    n = K.shape[-1]
    alpha, beta = z[..., :n], z[..., n:]
    X = alpha.unsqueeze(-2) + beta.unsqueeze(-1) - K
    gam = gamma[..., None]
    if kk < n:
        V, I = torch.topk(X, kk, dim=-1)
        Rv = V.clamp_min(0)
        P1 = torch.zeros_like(alpha).scatter_add(-1, I.flatten(-2), Rv.flatten(-2))
        Pt1 = Rv.sum(-1)
    else:
        R = X.clamp_min(0)
        P1, Pt1 = R.sum(-2), R.sum(-1)
    w = alpha.sum(-1, keepdim=True) - beta.sum(-1, keepdim=True)
    return torch.cat([P1 / gam - a + mu * w, Pt1 / gam - b - mu * w], dim=-1)


@torch.no_grad()
def dual_support(alpha: torch.Tensor, beta: torch.Tensor, K: torch.Tensor, kk: int,
                 sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(B, m, w)`` of the (at most ``k``) positive entries of each column, and their mask.

    ``w = kk`` without ``sync``; otherwise the largest number of positive entries of a column
    (at least 1, at most ``kk``).
    """
    X = alpha[:, None, :] + beta[:, :, None] - K
    w = kk
    if sync:
        w = max(1, min(kk, int((X > 0).sum(-1).max()) if X.numel() else 1))
    V, I = torch.topk(X, w, dim=-1)
    return I, V > 0


def dual_plan(alpha: torch.Tensor, beta: torch.Tensor, K: torch.Tensor, gamma: torch.Tensor,
              indices: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Plan values ``[α_i + β_j − K_ji]/γ`` on the support (differentiable)."""
    B, m, w = indices.shape
    xs = (torch.gather(alpha, 1, indices.reshape(B, -1)).reshape(B, m, w) + beta[:, :, None]
          - torch.gather(K, 2, indices))
    return torch.where(support, xs / gamma[:, None, None], torch.zeros_like(xs))


def dual_value(alpha: torch.Tensor, beta: torch.Tensor, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               gamma: torch.Tensor, indices: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``D(α, β)`` on a known support, ``(B,)`` (envelope gradients when the potentials are detached)."""
    B, m, w = indices.shape
    xs = (torch.gather(alpha, 1, indices.reshape(B, -1)).reshape(B, m, w) + beta[:, :, None]
          - torch.gather(K, 2, indices))
    sq = torch.where(support, xs * xs, torch.zeros_like(xs)).sum((1, 2))
    return (alpha * a).sum(-1) + (beta * b).sum(-1) - sq / (2 * gamma)

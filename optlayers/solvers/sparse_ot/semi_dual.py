r"""The (k-sparse) quadratically regularized OT *semi-dual*: objective, optimality, plan.

Canonical problem (the solver front transposes row-sparse problems into it): ``m`` constrained
columns, each a vector over ``n`` free rows, stored as the rows of ``K (B, m, n)`` (``K_j`` is
column ``j`` of the cost), masses ``a (B, n)`` and ``b (B, m)``. With
``Ω(t) = (γ/2)‖t‖² + ι{‖t‖₀ ≤ k}`` per column, the semi-dual (Blondel et al. 2018, eq. 10;
Liu et al. 2023) is

.. math::

    S(\alpha) = \langle \alpha, a\rangle - \sum_j \max_{t \in \Delta_{b_j},\ \lVert t\rVert_0 \le k}
                \Big[\langle t, \alpha - K_j\rangle - \tfrac{\gamma}{2}\lVert t\rVert^2\Big],
    \qquad t_j^\star = \Pi_{k, b_j}\big((\alpha - K_j)/\gamma\big),

the inner maximiser being the ``k``-sparse simplex projection (the kernel). By Danskin's theorem
``∇S(α) = a − Σ_j t_j^⋆``: the plan ``P_{:,j} = t_j^⋆`` meets the column marginals ``b`` exactly
and the row marginals at a stationary point. ``S`` is concave; with ``k`` large enough it is
differentiable with a Lipschitz gradient, and it equals the primal optimum (strong duality of
quadratically regularized OT); a binding ``k`` may leave a duality gap (the primal is
nonconvex), visible as a row-marginal violation.

Optimality condition used for implicit gradients: ``F(α) = P(α)1 − a + μ (1ᵀα) 1 = 0`` (the last
term fixes the shift invariance ``S(α + c1) = S(α)``; solutions are normalized to ``1ᵀα = 0``).
``∂_α F = Σ_j (1/γ)(D_{S_j} − 1_{S_j}1_{S_j}ᵀ/|S_j|) + μ11ᵀ`` is symmetric positive
semidefinite (singular where the support graph splits), so the adjoint system is solved by
MINRES.
"""

from __future__ import annotations

import torch

from ...kernels import Backend, dispatch
from ...kernels.sparse_simplex import KERNEL_NAME
from .projection import project_topk_simplex, support_values

__all__ = ["SemiDualOracle", "semi_dual_optimality", "semi_dual_plan", "semi_dual_value"]


class SemiDualOracle:
    """Value and gradient of ``f = −S`` on flat tensors, through the projection kernel.

    With ``adaptive`` the kernel runs with a *working width* ``w <= k`` grown on demand: when no
    column's projection fills all ``w`` slots, the ``w``-sparse projection equals the
    ``k``-sparse one (the simplex support is a prefix of the sorted entries), so quadratically
    regularized problems with small supports never pay for a full sort.
    """

    def __init__(self, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, kk: int, *,
                 backend: Backend | str | None, adaptive: bool, width: int = 8) -> None:
        self.K, self.a, self.b, self.gamma = K, a, b, gamma
        self.B, self.m, self.n = K.shape
        self.kk = kk
        self.adaptive = adaptive
        self.w = min(kk, width) if adaptive else kk
        self.fn = dispatch(KERNEL_NAME, backend=backend, device=K.device, size=K.numel())
        self.s = b.reshape(-1)
        self.Kg = (K / gamma[:, None, None]).reshape(-1, self.n)  # rows K_j/γ; offset α/γ

    def project(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` ``(B, m, w)`` of the ``k``-sparse projections of ``(α − K_j)/γ``."""
        off = z / self.gamma[:, None]
        while True:
            V, I = self.fn(self.Kg, self.w, self.s, off)
            if not self.adaptive or self.w >= self.kk:
                break
            full = (V > 0).sum(-1) >= self.w
            if not bool(full.any()):
                break
            self.w = min(self.kk, 4 * self.w)
        return V.reshape(self.B, self.m, -1), I.reshape(self.B, self.m, -1)

    def binding(self, V: torch.Tensor) -> torch.Tensor:
        """``(B,)``: some column's projection has ``k < n`` nonzeros (the constraint may bind)."""
        if self.kk >= self.n:
            return torch.zeros(self.B, dtype=torch.bool, device=V.device)
        return ((V > 0).sum(-1) >= self.kk).any(-1)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        V, I = self.project(z)
        Bf = self.B
        P1 = torch.zeros_like(z).scatter_add_(1, I.reshape(Bf, -1), V.reshape(Bf, -1))
        g = P1 - self.a
        # S = ⟨α, a − P1⟩ + ⟨P, K⟩ + (γ/2)‖P‖²: the same value as ⟨α, a⟩ − Σ_j[⟨t_j, α − K_j⟩ − (γ/2)‖t_j‖²]
        # without its cancellation, so that line searches resolve decreases near the optimum
        Kg = torch.gather(self.K, 2, I)
        S = -(z * g).sum(-1) + (V * (Kg + 0.5 * self.gamma[:, None, None] * V)).sum((1, 2))
        return -S, g, g.abs().sum(-1), self.binding(V)


def semi_dual_optimality(alpha: torch.Tensor, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         gamma: torch.Tensor, kk: int, mu: float) -> torch.Tensor:
    """``F(α) = P(α)1 − a + μ(1ᵀα)1`` in PyTorch operations (differentiable, vmappable).

    Shapes: ``alpha (..., n)``, ``K (..., m, n)``, ``a (..., n)``, ``b (..., m)``, ``gamma (...)``;
    ``kk`` is the projection width (a static int).
    """
    X = (alpha.unsqueeze(-2) - K) / gamma[..., None, None]
    V, I = project_topk_simplex(X, kk, b)
    P1 = torch.zeros_like(alpha).scatter_add(-1, I.flatten(-2), V.flatten(-2))
    return P1 - a + mu * alpha.sum(-1, keepdim=True)


def semi_dual_plan(alpha: torch.Tensor, K: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor,
                   indices: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan values on a known support, differentiable in ``alpha, K, b, gamma``.

    Returns:
        ``(values (B, m, w), beta (B, m))`` with ``β_j = −γ τ_j`` the column potentials
        (``P_ij = (α_i + β_j − K_ji)/γ`` on the support).
    """
    B, m, w = indices.shape
    xs = (torch.gather(alpha, 1, indices.reshape(B, -1)).reshape(B, m, w)
          - torch.gather(K, 2, indices)) / gamma[:, None, None]
    values = support_values(xs, support, b)
    cnt = support.sum(-1).clamp(min=1).to(xs.dtype)
    tau = (torch.where(support, xs, torch.zeros_like(xs)).sum(-1) - b) / cnt
    return values, -gamma[:, None] * tau


def semi_dual_value(alpha: torch.Tensor, K: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    gamma: torch.Tensor, indices: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``S(α)`` evaluated on a known support (``(B,)``); with ``alpha`` detached its gradients in
    ``K, a, b, γ`` are the envelope (Danskin) gradients ``∂S/∂K = P``, ``∂S/∂a = α``, ..."""
    B, m, w = indices.shape
    Kg = torch.gather(K, 2, indices)
    ag = torch.gather(alpha, 1, indices.reshape(B, -1)).reshape(B, m, w)
    xs = (ag - Kg) / gamma[:, None, None]
    t = support_values(xs, support, b)
    P1 = torch.zeros_like(alpha).scatter_add(1, indices.reshape(B, -1), t.reshape(B, -1))
    return (alpha * (a - P1)).sum(-1) + (t * (Kg + 0.5 * gamma[:, None, None] * t)).sum((1, 2))

r"""Batched factor/solve helpers for the KKT system of a dense QP.

The interior-point method and the implicit gradient of :func:`optlayers.layers.qp` both solve
linear systems with the symmetric KKT matrix of

.. math::

    \min_x \tfrac12 x^\top Q x + p^\top x \quad\text{s.t.}\quad Ax = b,\; Gx \le h,

namely, for a diagonal weight :math:`W = \operatorname{diag}(s / \lambda) \succ 0` (slack over
inequality dual),

.. math::

    K = \begin{bmatrix} Q & A^\top & G^\top \\ A & 0 & 0 \\ G & 0 & -W \end{bmatrix}.

:func:`factor_kkt` regularizes :math:`K` (quasi-definite form: :math:`+\delta` on the first
block, :math:`-\delta` on the other two) and eliminates both constraint blocks, leaving one
batched Cholesky factorization of
:math:`H = Q + \delta I + G^\top (W + \delta I)^{-1} G + A^\top A/\delta = LL^\top`, which
exists for PSD ``Q``, rank-deficient ``A`` and a vanishing ``W`` (LPs included);
:func:`solve_kkt` then removes the regularization's error by iterative refinement against the
unregularized :math:`K` (:func:`kkt_matvec`).

All tensors are *flat-batched*: a leading dimension ``B`` (or ``1`` for data shared by the
whole batch, which broadcasts); vectors are ``(B, k)``. Multiple right-hand sides are stacked
in a trailing dimension: ``(B, k, r)``.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["KKTFactor", "static_delta", "kkt_constant", "factor_kkt", "stack_constraints", "solve_kkt",
           "solve_kkt_c", "solve_regularized", "kkt_matvec", "kkt_matvec_c", "chol_solve", "bmv", "bmtv"]


def bmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``M v``: ``M (B|1, r, c)``, ``v (B, c)`` or ``(B, c, k)``.

    Written as row-vector products (``vᵀ Mᵀ``), which batched BLAS runs several times faster
    than batched matrix-vector products; shared ``M`` becomes one matrix-matrix product.
    """
    if M.shape[0] == 1:
        M = M[0]
    if v.dim() == 3:
        return (v.transpose(-1, -2) @ M.transpose(-1, -2)).transpose(-1, -2)
    if M.dim() == 2:
        return v @ M.transpose(-1, -2)
    return (v.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)


def bmtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``Mᵀ v``: ``M (B|1, r, c)``, ``v (B, r)`` or ``(B, r, k)``."""
    if M.shape[0] == 1:
        M = M[0]
    if v.dim() == 3:
        return (v.transpose(-1, -2) @ M).transpose(-1, -2)
    if M.dim() == 2:
        return v @ M
    return (v.unsqueeze(-2) @ M).squeeze(-2)


def static_delta(Q: torch.Tensor, A: torch.Tensor, G: torch.Tensor, B: int, reg: float) -> torch.Tensor:
    """The static regularization ``δ = reg · max(‖Q‖_max, ‖A‖²_max, ‖G‖²_max, 1)``, shape ``(B, 1)``."""
    def amax(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 0:
            return t.new_zeros(t.shape[0])
        return t.abs().reshape(t.shape[0], -1).amax(-1)

    one = torch.ones(B, dtype=Q.dtype, device=Q.device)
    scale = torch.stack(torch.broadcast_tensors(amax(Q), amax(G) ** 2, amax(A) ** 2, one), 0).amax(0)
    return (reg * scale).unsqueeze(-1)


@dataclasses.dataclass
class KKTFactor:
    r"""Factorization of the regularized KKT matrix (see the module docstring).

    Holds the Cholesky factor :math:`L` of
    :math:`H = Q + \delta I + C^\top \operatorname{diag}(d)\, C = L L^\top` with
    :math:`C = [A; G]` and :math:`d = [1/\delta;\ 1/(W + \delta)]`. The equality and inequality
    rows are stacked into one constraint matrix ``C = [A; G]`` with
    diagonal ``W_C = [0; W]``, so each product with the constraints is one batched matmul.

    Attributes:
        Q: ``(B|1, n, n)``.
        C: ``(B|1, k + m, n)`` the stacked constraints ``[A; G]``.
        k: The number of equality rows.
        w: ``(B, m)`` the diagonal ``W`` of the unregularized system.
        d: ``(B, k + m)`` elimination weights ``[1/δ; 1/(W + δ)]``.
        L: ``(B, n, n)`` Cholesky factor of ``H = Q + δ I + Cᵀ diag(d) C``.
        delta: ``(B, 1)`` the static regularization.
        ok: ``(B,)`` bool, False where the factorization failed.

    Example:
        >>> import torch
        >>> from optlayers.solvers.qp import factor_kkt
        >>> Q = torch.eye(3, dtype=torch.float64)[None]
        >>> A = torch.ones(1, 1, 3, dtype=torch.float64); G = -torch.eye(3, dtype=torch.float64)[None]
        >>> w, delta = torch.ones(1, 3, dtype=torch.float64), torch.full((1, 1), 1e-8, dtype=torch.float64)
        >>> f = factor_kkt(Q, A, G, w, delta)
        >>> f.L.shape, f.C.shape, f.k, bool(f.ok.all())
        (torch.Size([1, 3, 3]), torch.Size([1, 4, 3]), 1, True)
        >>> H = Q + 1e-8 * torch.eye(3, dtype=torch.float64) + f.C.mT @ torch.diag_embed(f.d) @ f.C
        >>> torch.allclose(f.L @ f.L.mT, H)
        True
    """

    Q: torch.Tensor
    C: torch.Tensor
    k: int
    w: torch.Tensor
    d: torch.Tensor
    L: torch.Tensor
    delta: torch.Tensor
    ok: torch.Tensor

    @property
    def A(self) -> torch.Tensor:
        return self.C[..., : self.k, :]

    @property
    def G(self) -> torch.Tensor:
        return self.C[..., self.k:, :]

    @property
    def wc(self) -> torch.Tensor:
        """``[0; W]``, the constraint block of the unregularized KKT matrix, ``(B, k + m)``."""
        if self.k == 0:
            return self.w
        return torch.cat([self.w.new_zeros(self.w.shape[0], self.k), self.w], -1)


def _safe_cholesky(H: torch.Tensor, delta: torch.Tensor, retry: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky; elements that fail are retried once with a larger ridge.

    Returns the factor (identity where it still failed, so solves stay finite) and an ok mask.
    With ``retry=False`` (no host synchronisation) failed elements keep LAPACK's partial factor;
    their ``ok`` is False and the caller discards their step.
    """
    L, info = torch.linalg.cholesky_ex(H)
    ok = info == 0
    if not retry or H.shape[-1] == 0 or bool(ok.all()):
        return L, ok
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    diag_max = H.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    ridge = torch.maximum(1e4 * delta, 1e3 * torch.finfo(H.dtype).eps * diag_max)
    L2, info2 = torch.linalg.cholesky_ex(H + ridge.unsqueeze(-1) * eye)
    L = torch.where(ok[:, None, None], L, L2)
    ok = ok | (info2 == 0)
    return torch.where(ok[:, None, None], L, eye), ok


def chol_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ r`` for ``r (..., n, k)`` by two triangular solves (faster than cholesky_solve)."""
    y = torch.linalg.solve_triangular(L, r, upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True)


def kkt_constant(Q: torch.Tensor, A: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The part of ``H`` that does not change between interior-point iterations."""
    H0 = Q + delta.unsqueeze(-1) * torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    if A.shape[-2]:
        H0 = H0 + (A.transpose(-1, -2) @ A) / delta.unsqueeze(-1)
    return H0


def factor_kkt(Q: torch.Tensor, A: torch.Tensor, G: torch.Tensor, w: torch.Tensor,
               delta: torch.Tensor, *, retry: bool = True, H0: torch.Tensor | None = None,
               C: torch.Tensor | None = None, Gt: torch.Tensor | None = None) -> KKTFactor:
    """Factor the regularized KKT matrix for a batch.

    The regularized system replaces the zero block by ``-δ I`` and ``W`` by ``W + δ I`` and adds
    ``δ I`` to ``Q``; eliminating both constraint blocks leaves one Cholesky factorization of
    ``H = Q + δ I + Gᵀ (W + δ I)⁻¹ G + Aᵀ A / δ``, which is positive definite for any PSD ``Q``
    and any ``A`` (rank-deficient included).

    Args:
        Q: ``(B|1, n, n)`` symmetric PSD.
        A: ``(B|1, p, n)`` equality constraints (``p`` may be 0).
        G: ``(B|1, m, n)`` inequality constraints (``m`` may be 0).
        w: ``(B, m)`` positive diagonal ``W``.
        delta: ``(B, 1)`` static regularization.
        retry: Retry failed Cholesky factorizations with a larger ridge (a host sync).
        H0: The constant part ``Q + δ I + Aᵀ A / δ`` when precomputed (:func:`kkt_constant`).
        C: ``[A; G]`` when precomputed.
        Gt: ``Gᵀ`` when precomputed (any layout).

    Returns:
        The :class:`KKTFactor`.

    Example:
        With ``Q`` only PSD and the static regularization ``δ = 10⁻⁸``, one refined solve matches a
        dense solve of the unregularized ``K``:

        >>> import torch
        >>> from optlayers.solvers.qp import factor_kkt, kkt_matvec, solve_kkt
        >>> Q = torch.tensor([[[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
        >>> A = torch.ones(1, 1, 3, dtype=torch.float64)   # (B, p, n) = (1, 1, 3)
        >>> G = -torch.eye(3, dtype=torch.float64)[None]    # (1, 3, 3)
        >>> w = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
        >>> K = torch.zeros(7, 7, dtype=torch.float64)     # the dense K, to check against
        >>> K[:3, :3], K[3:4, :3], K[:3, 3:4], K[4:, :3], K[:3, 4:] = Q[0], A[0], A[0].T, G[0], G[0].T
        >>> K[4:, 4:] = -torch.diag(w[0])
        >>> f = factor_kkt(Q, A, G, w, torch.full((1, 1), 1e-8, dtype=torch.float64))
        >>> r = torch.arange(1.0, 8.0, dtype=torch.float64)
        >>> x, y, z = solve_kkt(f, r[None, :3], r[None, 3:4], r[None, 4:])
        >>> torch.allclose(torch.cat([x, y, z], -1)[0], torch.linalg.solve(K, r))
        True
    """
    B = w.shape[0]
    n, k = Q.shape[-1], A.shape[-2]
    dg = 1.0 / (w + delta)
    if H0 is None:
        H0 = kkt_constant(Q, A, delta)
    if C is None:
        C = stack_constraints(A, G)
    if Gt is None:
        Gt = G.transpose(-1, -2)
    GtD = Gt * dg.unsqueeze(-2)  # (B, n, m)
    if G.shape[0] == B and G.shape[-2]:
        H = torch.baddbmm(H0, GtD, G)  # one fused batched GEMM: H0 + Gᵀ D G
    else:
        H = H0 + GtD @ G[0] if G.shape[0] == 1 else H0 + GtD @ G
    if H.shape[0] != B:
        H = H.expand(B, n, n)
    L, ok = _safe_cholesky(H, delta, retry)
    d = torch.cat([(1.0 / delta).expand(B, k), dg], -1) if k else dg
    return KKTFactor(Q=Q, C=C, k=k, w=w, d=d, L=L, delta=delta, ok=ok)


def stack_constraints(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``C = [A; G]`` (batch dimensions broadcast)."""
    if A.shape[:-2] != G.shape[:-2]:
        lead = torch.broadcast_shapes(A.shape[:-2], G.shape[:-2])
        A, G = A.expand(*lead, *A.shape[-2:]), G.expand(*lead, *G.shape[-2:])
    return torch.cat([A, G], -2)


def solve_regularized(f: KKTFactor, rx: torch.Tensor, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One solve with the regularized factorization; ``rx (B, n, r)``, ``rc (B, k + m, r)``."""
    dd = f.d.unsqueeze(-1)
    dx = chol_solve(f.L, rx + bmtv(f.C, dd * rc))
    return dx, dd * (bmv(f.C, dx) - rc)


def kkt_matvec_c(f: KKTFactor, x: torch.Tensor, yc: torch.Tensor,
                 wc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unregularized product ``K [x; y_C]`` with the stacked constraints; ``(B, ·, r)``."""
    wc = f.wc if wc is None else wc
    return bmv(f.Q, x) + bmtv(f.C, yc), bmv(f.C, x) - wc.unsqueeze(-1) * yc


def solve_kkt_c(f: KKTFactor, rx: torch.Tensor, rc: torch.Tensor, *, refine: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``K [x; y_C] = [rx; rc]`` (stacked constraints, ``(B, ·, r)``) with refinement."""
    x, yc = solve_regularized(f, rx, rc)
    if refine:
        wc = f.wc
        for _ in range(refine):
            kx, kc = kkt_matvec_c(f, x, yc, wc)
            ex, ec = solve_regularized(f, rx - kx, rc - kc)
            x, yc = x + ex, yc + ec
    return x, yc


def kkt_matvec(Q: torch.Tensor, A: torch.Tensor, G: torch.Tensor, w: torch.Tensor,
               x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The unregularized product ``K [x; y; z]``; vectors ``(B, k)`` or ``(B, k, r)``.

    .. math::

        K \begin{bmatrix} x \\ y \\ z \end{bmatrix} =
        \begin{bmatrix} Qx + A^\top y + G^\top z \\ Ax \\ Gx - Wz \end{bmatrix}.

    Args:
        Q, A, G: ``(B|1, n, n)``, ``(B|1, p, n)``, ``(B|1, m, n)``.
        w: ``(B, m)`` the diagonal ``W``.
        x, y, z: ``(B, n)``, ``(B, p)``, ``(B, m)`` (or with a trailing ``r`` dimension).

    Returns:
        The three blocks of ``K [x; y; z]``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.qp import factor_kkt, kkt_matvec, solve_kkt
        >>> Q = torch.tensor([[[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
        >>> A = torch.ones(1, 1, 3, dtype=torch.float64)   # (B, p, n) = (1, 1, 3)
        >>> G = -torch.eye(3, dtype=torch.float64)[None]    # (1, 3, 3)
        >>> w = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
        >>> K = torch.zeros(7, 7, dtype=torch.float64)     # the dense K, to check against
        >>> K[:3, :3], K[3:4, :3], K[:3, 3:4], K[4:, :3], K[:3, 4:] = Q[0], A[0], A[0].T, G[0], G[0].T
        >>> K[4:, 4:] = -torch.diag(w[0])
        >>> v = torch.arange(1.0, 8.0, dtype=torch.float64)
        >>> out = kkt_matvec(Q, A, G, w, v[None, :3], v[None, 3:4], v[None, 4:])
        >>> torch.allclose(torch.cat(out, -1)[0], K @ v)
        True
    """
    ww = w if x.dim() == 2 else w.unsqueeze(-1)
    return (bmv(Q, x) + bmtv(A, y) + bmtv(G, z), bmv(A, x), bmv(G, x) - ww * z)


def solve_kkt(f: KKTFactor, rx: torch.Tensor, ry: torch.Tensor, rz: torch.Tensor, *,
              refine: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``K [x; y; z] = [rx; ry; rz]`` with iterative refinement.

    Args:
        f: A factorization from :func:`factor_kkt`.
        rx, ry, rz: ``(B, n)``, ``(B, p)``, ``(B, m)``, or with a trailing ``r`` dimension for
            several right-hand sides at once.
        refine: Refinement steps against the unregularized ``K``.

    Returns:
        ``(x, y, z)`` with the shapes of the right-hand sides.

    Example:
        Several right-hand sides at once (trailing dimension), against a dense solve of ``K``:

        >>> import torch
        >>> from optlayers.solvers.qp import factor_kkt, kkt_matvec, solve_kkt
        >>> Q = torch.tensor([[[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
        >>> A = torch.ones(1, 1, 3, dtype=torch.float64)   # (B, p, n) = (1, 1, 3)
        >>> G = -torch.eye(3, dtype=torch.float64)[None]    # (1, 3, 3)
        >>> w = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
        >>> K = torch.zeros(7, 7, dtype=torch.float64)     # the dense K, to check against
        >>> K[:3, :3], K[3:4, :3], K[:3, 3:4], K[4:, :3], K[:3, 4:] = Q[0], A[0], A[0].T, G[0], G[0].T
        >>> K[4:, 4:] = -torch.diag(w[0])
        >>> f = factor_kkt(Q, A, G, w, torch.full((1, 1), 1e-8, dtype=torch.float64))
        >>> R = torch.randn(7, 2, dtype=torch.float64)
        >>> x, y, z = solve_kkt(f, R[None, :3], R[None, 3:4], R[None, 4:])
        >>> x.shape, y.shape, z.shape
        (torch.Size([1, 3, 2]), torch.Size([1, 1, 2]), torch.Size([1, 3, 2]))
        >>> torch.allclose(torch.cat([x, y, z], -2)[0], torch.linalg.solve(K, R))
        True
    """
    vec = rx.dim() == 2
    if vec:
        rx, ry, rz = rx.unsqueeze(-1), ry.unsqueeze(-1), rz.unsqueeze(-1)
    x, yc = solve_kkt_c(f, rx, torch.cat([ry, rz], -2), refine=refine)
    y, z = yc[..., : f.k, :], yc[..., f.k:, :]
    if vec:
        x, y, z = x.squeeze(-1), y.squeeze(-1), z.squeeze(-1)
    return x, y, z

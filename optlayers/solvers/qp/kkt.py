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
           "solve_kkt_c", "solve_regularized", "kkt_matvec", "kkt_matvec_c", "chol_solve", "bmv", "bmtv",
           "SchurConstant", "SchurFactor", "schur_constant", "factor_schur", "solve_schur", "solve_schur_ineq",
           "solve_any"]


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


# ------------------------------------------------------------------------------------------
# Inequality Schur-complement form: for Q ≻ 0 and A of full row rank, the equality-constrained
# part K₀ = [[Q, Aᵀ], [A, 0]] does not change between interior-point iterations, so its inverse is
# formed once per solve and each iteration factors only the m × m matrix M + W.
@dataclasses.dataclass
class SchurConstant:
    r"""The iteration-independent part of the Schur-complement form of the KKT system.

    With :math:`K_0 = \begin{bmatrix} Q & A^\top \\ A & 0 \end{bmatrix}` (invertible when
    :math:`Q \succ 0` and ``A`` has full row rank), eliminating ``(x, y)`` from

    .. math::

        Q\,dx + A^\top dy + G^\top dz = r_x,\quad A\,dx = r_y,\quad G\,dx - W dz = r_z

    leaves :math:`(M + W)\,dz = [G\ 0]\,K_0^{-1} [r_x; r_y] - r_z` with the constant
    :math:`M = [G\ 0]\,K_0^{-1}\,[G\ 0]^\top \succeq 0`, and then
    :math:`[dx; dy] = K_0^{-1}[r_x; r_y] - ([G\ 0] K_0^{-1})^\top dz`. Every iteration therefore
    costs one ``m × m`` Cholesky factorization of ``M + W`` and a few matrix–vector products,
    instead of forming :math:`G^\top D G` (``n²m``) and factoring an ``n × n`` matrix.

    Attributes:
        KG: ``(B|1, n + k + m, n + k)``: ``K₀⁻¹`` stacked over ``[G 0] K₀⁻¹``.
        M: ``(B|1, m, m)``.
        delta: ``(B|1, 1)`` static regularization added to ``W`` (``reg · max diag M``), which
            keeps ``M + W`` definite when rounding leaves ``M`` slightly indefinite and ``W``
            vanishes (degenerate or infeasible problems); the interior point's Newton directions
            tolerate that relative error.
        n, k: Numbers of variables and of equality rows.
    """

    KG: torch.Tensor
    M: torch.Tensor
    delta: torch.Tensor
    n: int
    k: int

    def rows(self, sel: torch.Tensor) -> SchurConstant:
        """The constant part for the batch rows ``sel`` (shared data is kept)."""
        KG = self.KG if self.KG.shape[0] == 1 else self.KG[sel]
        M = self.M if self.M.shape[0] == 1 else self.M[sel]
        delta = self.delta if self.delta.shape[0] == 1 else self.delta[sel]
        return SchurConstant(KG=KG, M=M, delta=delta, n=self.n, k=self.k)


def _cond1(M: torch.Tensor, Minv: torch.Tensor) -> torch.Tensor:
    """The 1-norm condition number ``‖M‖₁ ‖M⁻¹‖₁`` per batch element (NaN stays NaN)."""
    return M.abs().sum(-2).amax(-1) * Minv.abs().sum(-2).amax(-1)


def schur_constant(Q: torch.Tensor, A: torch.Tensor, G: torch.Tensor, max_cond: float,
                   valid: torch.Tensor | None = None, reg: float = 0.0) -> SchurConstant | None:
    r"""Form :class:`SchurConstant` when ``K₀`` is safely invertible, else return None.

    Computed in float64 (whatever the data's dtype) from the Cholesky factors of ``Q`` and of
    :math:`S_A = A Q^{-1} A^\top`; with :math:`R = Q^{-1}A^\top S_A^{-1}`,

    .. math::

        K_0^{-1} = \begin{bmatrix} Q^{-1} - R\,A Q^{-1} & R \\ R^\top & -S_A^{-1} \end{bmatrix}.

    Returns None (the caller then uses the regularized normal-equation form of
    :func:`factor_kkt`) when a factorization fails or the 1-norm condition number of ``Q`` or of
    ``S_A`` exceeds ``max_cond`` for any element marked in ``valid`` (PSD-only ``Q``, LPs,
    rank-deficient ``A``).

    Args:
        Q, A, G: ``(B|1, n, n)``, ``(B|1, k, n)``, ``(B|1, m, n)``.
        max_cond: Largest accepted condition number.
        reg: Relative static regularization of ``M + W`` (:attr:`SchurConstant.delta`).
        valid: ``(B,)`` bool, the elements that count (non-finite data is handled elsewhere).

    Example:
        >>> import torch
        >>> from optlayers.solvers.qp.kkt import schur_constant
        >>> Q, G = torch.eye(2, dtype=torch.float64)[None], torch.eye(2, dtype=torch.float64)[None]
        >>> sc = schur_constant(Q, torch.ones(1, 1, 2, dtype=torch.float64), G, 1e8)
        >>> sc.KG.shape, sc.M.shape
        (torch.Size([1, 5, 3]), torch.Size([1, 2, 2]))
        >>> schur_constant(0 * Q, torch.zeros(1, 0, 2, dtype=torch.float64), G, 1e8) is None  # an LP
        True
    """
    n, k, m = Q.shape[-1], A.shape[-2], G.shape[-2]
    f64 = torch.float64
    Qd, Ad, Gd = Q.to(f64), A.to(f64), G.to(f64)

    def failed(info: torch.Tensor, cond: torch.Tensor | None = None) -> bool:
        fail = info != 0
        if cond is not None:
            fail = fail | ~(cond <= max_cond)
        if valid is not None and fail.shape[0] == valid.shape[0]:
            fail = fail & valid
        return bool(fail.any())

    def inverse(L: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        # Elements outside `valid` may hold a failed factor: invert the identity there instead.
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        return torch.cholesky_inverse(torch.where((info == 0)[..., None, None], L, eye))

    Lq, info = torch.linalg.cholesky_ex(Qd)
    if failed(info):
        return None
    Qi = inverse(Lq, info)
    if failed(info, _cond1(Qd, Qi)):
        return None
    if k:
        QiAt = Qi @ Ad.transpose(-1, -2)  # (·, n, k)
        SA = Ad @ QiAt
        LA, info = torch.linalg.cholesky_ex(SA)
        if failed(info):
            return None
        SAi = inverse(LA, info)
        if failed(info, _cond1(SA, SAi)):
            return None
        R = QiAt @ SAi  # (·, n, k)
        lead = torch.broadcast_shapes(Qi.shape[:-2], R.shape[:-2])
        Kinv = Qd.new_empty(*lead, n + k, n + k)
        # Only products with Kinv are formed, so rounding-level asymmetry of P does no harm.
        Kinv[..., :n, :n] = torch.baddbmm(Qi.expand(*lead, n, n), R.expand(*lead, n, k),
                                          QiAt.transpose(-1, -2).expand(*lead, k, n), alpha=-1.0)
        Kinv[..., :n, n:] = R
        Kinv[..., n:, :n] = R.transpose(-1, -2)
        Kinv[..., n:, n:] = -SAi
    else:
        Kinv = Qi
    GK = Gd @ Kinv[..., :n, :]  # (·, m, n + k)
    M = GK[..., :n] @ Gd.transpose(-1, -2)  # only its lower triangle is read (Cholesky)
    lead = torch.broadcast_shapes(Kinv.shape[:-2], GK.shape[:-2])
    KG = Qd.new_empty(*lead, n + k + m, n + k, dtype=Q.dtype)
    KG[..., : n + k, :] = Kinv
    KG[..., n + k:, :] = GK
    delta = reg * M.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1.0)
    return SchurConstant(KG=KG, M=M.to(Q.dtype), delta=delta.to(Q.dtype), n=n, k=k)


@dataclasses.dataclass
class SchurFactor:
    """Cholesky factor of ``M + W`` (see :class:`SchurConstant`) for one iteration.

    Attributes:
        sc: The constant part.
        L: ``(B, m, m)`` lower Cholesky factor of ``M + diag(w)``.
        ok: ``(B,)`` bool, False where the factorization failed.
    """

    sc: SchurConstant
    L: torch.Tensor
    ok: torch.Tensor


def factor_schur(sc: SchurConstant, w: torch.Tensor, *, retry: bool = True) -> SchurFactor:
    """Factor ``M + diag(w)`` for ``w (B, m) > 0`` (see :class:`SchurConstant`)."""
    B, m = w.shape
    S = sc.M.expand(B, m, m).clone()
    # W is clamped at 1/eps² (an inactive row's dz is then ~0 either way) so that s/λ = inf at a
    # solution (λ = 0) keeps the factor finite.
    big = 1.0 / torch.finfo(w.dtype).eps ** 2
    S.diagonal(dim1=-2, dim2=-1).add_(w.clamp_max(big) + sc.delta)
    L, ok = _safe_cholesky(S, sc.delta.expand(B, 1), retry)
    return SchurFactor(sc=sc, L=L, ok=ok)


def solve_schur(f: SchurFactor, rx: torch.Tensor, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``K [x; y_C] = [rx; rc]`` (stacked constraints, ``(B, ·, r)``) in the Schur form."""
    n, k = f.sc.n, f.sc.k
    r0 = torch.cat([rx, rc[:, :k]], -2) if k else rx  # (B, n + k, r)
    out = bmv(f.sc.KG, r0)  # [K₀⁻¹ r0; [G 0] K₀⁻¹ r0]
    dz = chol_solve(f.L, out[:, n + k:] - rc[:, k:])
    d0 = out[:, : n + k] - bmtv(f.sc.KG[:, n + k:], dz)
    return d0[:, :n], torch.cat([d0[:, n:], dz], -2)


def solve_schur_ineq(f: SchurFactor, rz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``K [x; y_C] = [0; 0; rz]`` (right-hand side in the inequality rows only), ``rz (B, m, r)``.

    With ``r₀ = 0`` the product with ``K₀⁻¹`` drops out: ``dz = -(M + W)⁻¹ rz`` and
    ``[dx; dy] = -([G 0] K₀⁻¹)ᵀ dz``.
    """
    n, k = f.sc.n, f.sc.k
    dz = -chol_solve(f.L, rz)
    d0 = -bmtv(f.sc.KG[:, n + k:], dz)
    return d0[:, :n], torch.cat([d0[:, n:], dz], -2)


def solve_any(f: KKTFactor | SchurFactor, rx: torch.Tensor, rc: torch.Tensor, *, refine: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`solve_kkt_c` or :func:`solve_schur`, whichever form ``f`` is in."""
    if isinstance(f, SchurFactor):
        return solve_schur(f, rx, rc)
    return solve_kkt_c(f, rx, rc, refine=refine)

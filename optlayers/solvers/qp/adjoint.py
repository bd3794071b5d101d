r"""Implicit differentiation of a QP solution: the KKT optimality condition and its linear solver.

The solution ``z = (x, ν, λ)`` of ``min ½xᵀQx + pᵀx s.t. Ax = b, Gx ≤ h`` is a root of

.. math::

    F(z, \theta) = \begin{bmatrix} Qx + p + A^\top\nu + G^\top\lambda \\ Ax - b \\
    D(\lambda)\,\hat D(\lambda)^{-1} (Gx - h) \end{bmatrix},

OptNet's differential form of the KKT conditions (Amos & Kolter, 2017) with the complementarity
row ``λ ⊙ (Gx − h)`` divided by the (constant) value :math:`\hat\lambda` of ``λ`` at the
solution. The scaling does not change the root or the implicit derivatives, and it makes the
Jacobian :math:`\partial_z F` exactly the *symmetric* KKT matrix of :mod:`.kkt` with
:math:`W = \operatorname{diag}(s / \lambda)`, so one factorization serves the adjoint
(``(∂_z F)ᵀ``), tangent (``∂_z F``) and second-order systems alike. (The interior point stops
at a tiny complementarity ``μ``, so strictly these are the derivatives of the central-path point
``λ ⊙ s = μ``, which agree with those of the solution up to ``O(μ)``.)

:class:`KKTSolve` is the :class:`~optlayers.implicit.LinearSolver` that solves those systems
with the batched factorization of the KKT matrix at the returned solution, computed once per
:func:`~optlayers.layers.qp` call (on the first gradient request, from the constant part
``Q + δI + AᵀA/δ`` and the stacked constraints the interior point already built) and reused by
every adjoint, tangent and second-order solve of that call: the regularized Cholesky form of :mod:`.kkt`, with
iterative refinement against the exact operator, and, for the elements it leaves above the
tolerance, a batched LU of the symmetrically scaled full KKT matrix. A system that cannot be
matched to the cached factorizations (an unusual nesting of ``torch.func`` transforms) goes to
:class:`~optlayers.implicit.Dense`. The residual of every solve is checked, so a singular KKT
matrix (a non-unique solution, a degenerate vertex) is reported, never hidden.

The interior point's own last factorization is *not* reused as the solve's factor: it was made
at the previous iterate, whose weights ``W = s/λ`` differ from the solution's by the last step's
reduction of ``μ`` (about ×100), and rows with ``W`` near the regularization ``δ`` change the
factor a lot (on the benchmark problems of ``benchmarks/bench_qp.py`` the spectral radius of
``I − H_prev⁻¹ H`` was 0.14 at the median and up to ~96, so refinement with it needs many more
steps or diverges). One ``Gᵀ D G`` product and Cholesky factorization at the solution, starting
from the interior point's constant part, is cheaper than those extra refinement steps. Where the
compiled interior point ran (:mod:`optlayers.kernels.qp_ipm_numba`), it made that factorization at
the end of each element's solve, in cache, and the cache takes it as it is; the solves with it
then run compiled too (:func:`optlayers.kernels.qp_kkt_numba.kkt_solve_numba`, one pass per element)
wherever the right-hand side is a plain CPU tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..._result import Result, Status
from ...implicit.linear_solvers import Dense, LinearOperator, LinearSolver
from ...implicit.linear_solvers._base import finish
from .kkt import KKTFactor, SchurConstant, SchurFactor, factor_kkt, factor_schur, solve_any, stack_constraints

__all__ = ["qp_optimality", "KKTSolve", "KKTCache"]


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # As a row-vector product (vᵀMᵀ): batched BLAS runs it several times faster than M v.
    return (v.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)


def _mtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v.unsqueeze(-2) @ M).squeeze(-2)


def qp_optimality(z: tuple[torch.Tensor, torch.Tensor, torch.Tensor], Q: torch.Tensor, p: torch.Tensor,
                  G: torch.Tensor, h: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                  *extra: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""KKT residual ``F(z, θ)`` of a QP for ``z = (x, ν, λ)`` (see the module docstring).

    .. math::

        F(z, \theta) = \big(Qx + p + A^\top\nu + G^\top\lambda,\ \ Ax - b,\ \
        (\lambda / \hat\lambda) \odot (Gx - h)\big), \qquad \hat\lambda = \operatorname{sg}(\lambda)
        \text{ (1 where } \lambda \le 0).

    Non-finite entries of ``z`` (the NaN solutions of failed elements) are read as 0 so that a
    failed element contributes a zero, finite gradient when its cotangent is zero.

    Args:
        z: ``(x (*batch, n), ν (*batch, p), λ (*batch, m))``.
        Q, p, G, h, A, b: The data (shared or batched, broadcasting against ``z``).
        *extra: Ignored (non-differentiated inputs passed along to the solver).

    Returns:
        The residual blocks, shaped like ``z``.

    The value of the third block at an *inactive* constraint (whose ``λ`` the interior point
    leaves tiny but positive, so ``λ/λ̂ = 1``) is ``Gx − h``, not 0; only the Jacobian
    :math:`\partial_z F` (the KKT matrix) enters the gradients, and a constant shift does not
    change it.

    Example:
        The residual vanishes at the interior point's solution when every constraint is active:

        >>> import torch
        >>> from optlayers.solvers.qp import solve_qp, qp_optimality
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.full((2,), 0.5, dtype=torch.float64)
        >>> A, b = torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        >>> res = solve_qp(Q, p, G, h, A, b)
        >>> F = qp_optimality((res.solution, res.aux.eq_dual, res.aux.ineq_dual), Q, p, G, h, A, b)
        >>> [bool(torch.linalg.vector_norm(r) < 1e-9) for r in F]
        [True, True, True]
    """
    x, nu, lam = (torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in z)
    lam_c = lam.detach()
    lam_c = torch.where(lam_c > 0, lam_c, torch.ones_like(lam_c)).clamp_min(torch.finfo(lam.dtype).tiny)
    r1 = _mv(Q, x) + p + _mtv(A, nu) + _mtv(G, lam)
    r2 = _mv(A, x) - b
    r3 = (lam / lam_c) * (_mv(G, x) - h)
    shape = x.shape[:-1]
    return (r1.expand(*shape, r1.shape[-1]), r2.expand(*shape, r2.shape[-1]), r3.expand(*shape, r3.shape[-1]))


@dataclasses.dataclass
class _Entry:
    Q: torch.Tensor
    A: torch.Tensor
    G: torch.Tensor
    w: torch.Tensor
    delta: torch.Tensor
    valid: torch.Tensor
    H0: torch.Tensor | None = None
    C: torch.Tensor | None = None
    schur: SchurConstant | None = None
    factor: KKTFactor | SchurFactor | None = None
    lu: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    compiled: bool = False  # the factorization came from the compiled interior point

    @property
    def B(self) -> int:
        return self.w.shape[0]

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.Q.shape[-1], self.A.shape[-2], self.G.shape[-2]

    def cholesky(self) -> KKTFactor | SchurFactor:
        if self.factor is None:
            if self.schur is not None:
                self.factor = factor_schur(self.schur, self.w)
            else:
                self.factor = factor_kkt(self.Q, self.A, self.G, self.w, self.delta, H0=self.H0, C=self.C)
            self.H0 = self.schur = None  # no longer needed
        return self.factor

    def scaled_lu(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LU of ``S K S`` with ``S = diag(1, 1, 1/√max(W, 1))``: every entry is bounded by the data."""
        if self.lu is None:
            n, k, m = self.sizes
            B, dt, dev = self.B, self.w.dtype, self.w.device
            sc = self.w.clamp_min(1.0).rsqrt()  # (B, m)
            Gs = self.G * sc.unsqueeze(-1)  # (B, m, n)
            K = torch.zeros(B, n + k + m, n + k + m, dtype=dt, device=dev)
            K[:, :n, :n] = self.Q
            K[:, n:n + k, :n] = self.A
            K[:, :n, n:n + k] = self.A.transpose(-1, -2)
            K[:, n + k:, :n] = Gs
            K[:, :n, n + k:] = Gs.transpose(-1, -2)
            K[:, n + k:, n + k:] = torch.diag_embed(-self.w * sc * sc)
            LU, piv, _ = torch.linalg.lu_factor_ex(K)
            self.lu = (LU, piv, sc)
        return self.lu


class KKTCache:
    r"""The KKT data of the forward solves of one :func:`~optlayers.layers.qp` call.

    It holds, per solve, what the KKT matrix at the solution needs,

    .. math::

        K = \begin{bmatrix} Q & A^\top & G^\top \\ A & 0 & 0 \\ G & 0 & -W \end{bmatrix},
        \qquad W = \operatorname{diag}(s / \lambda),

    and its factorizations once made. Each forward solve (one, or one per slice under
    ``torch.func.vmap``) appends its flat data,
    the weights ``W = s/λ`` at its solution and a validity mask; factorizations are computed on
    the first gradient request and kept for every later solve of the same call.

    Example:
        >>> import torch
        >>> from optlayers.solvers.qp import KKTCache, solve_qp
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.full((2,), 0.5, dtype=torch.float64)
        >>> A = torch.zeros(0, 2, dtype=torch.float64)
        >>> res = solve_qp(Q, p, G, h)
        >>> cache = KKTCache()
        >>> cache.add(Q[None], A[None], G[None], res.aux.slack[None], res.aux.ineq_dual[None],
        ...           delta=torch.full((1, 1), 1e-8, dtype=torch.float64), valid=torch.tensor([True]))
        >>> len(cache.entries), bool((cache.entries[0].w < 1e-9).all())  # W = s/λ ≈ 0: both active
        (1, True)
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def add(self, Q: torch.Tensor, A: torch.Tensor, G: torch.Tensor, slack: torch.Tensor,
            ineq_dual: torch.Tensor, delta: torch.Tensor, valid: torch.Tensor, *,
            H0: torch.Tensor | None = None, C: torch.Tensor | None = None,
            schur: SchurConstant | None = None,
            factor_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Record one solve (flat tensors: ``(B|1, ...)`` data, ``(B, m)`` slack and dual).

        ``H0`` and ``C`` are the constant part of the reduced KKT matrix and the stacked
        constraints ``[A; G]`` as the interior point computed them (:func:`.kkt.kkt_constant`,
        :func:`.kkt.stack_constraints`), so the gradient's factorization only adds ``Gᵀ D G``
        at the solution's weights to ``H0`` and factors the sum. With ``schur`` (the interior
        point's :class:`.kkt.SchurConstant`, when it ran in that form) the factorization is
        instead the ``m × m`` Cholesky factor of ``M + W`` at the solution's weights. With
        ``factor_parts = (L, d, ok)`` (the compiled interior point made the regularized factorization
        at these same weights, :func:`optlayers.kernels.qp_ipm_numba._solution_factor`), that
        factorization is used as it is.
        """
        tiny = torch.finfo(slack.dtype).tiny
        ok = valid.unsqueeze(-1) & torch.isfinite(slack) & torch.isfinite(ineq_dual)
        w = torch.where(ok, slack.clamp_min(tiny) / ineq_dual.clamp_min(tiny), torch.ones_like(slack))
        entry = _Entry(Q=Q, A=A, G=G, w=w, delta=delta, valid=valid, H0=H0, C=C, schur=schur)
        if factor_parts is not None and schur is None:
            L, d, fok = factor_parts
            Cf = C if C is not None else stack_constraints(A, G)
            entry.factor = KKTFactor(Q=Q, C=Cf, k=A.shape[-2], w=w, d=d, L=L, delta=delta, ok=fok)
            entry.H0 = None
            entry.compiled = True
        self.entries.append(entry)


def _compiled_solve_applies(e: _Entry, f: KKTFactor | SchurFactor, rhs: torch.Tensor) -> bool:
    """Whether the compiled solve can take this entry's solve (see :func:`_solve_cholesky`)."""
    return (e.compiled and isinstance(f, KKTFactor) and rhs.device.type == "cpu" and rhs.dtype == f.L.dtype
            and not rhs.requires_grad and not torch._C._functorch.is_functorch_wrapped_tensor(rhs))


def _solve_cholesky(e: _Entry, rhs: torch.Tensor) -> torch.Tensor:
    """Regularized KKT solve of one entry for ``rhs (V, B, N)`` (V broadcasts).

    Where the factorization came from the compiled interior point (so Numba is there and the
    data are on the CPU) and the right-hand side is a plain tensor, the solve is the compiled
    :func:`optlayers.kernels.qp_kkt_numba.kkt_solve_numba` (the same arithmetic, one pass per
    element); otherwise the batched triangular solves of :func:`.kkt.solve_any`.
    """
    f = e.cholesky()
    n = e.sizes[0]
    r = rhs.expand(rhs.shape[0], e.B, rhs.shape[-1]).permute(1, 2, 0)  # (B, N, V): V right-hand sides
    if _compiled_solve_applies(e, f, rhs):
        from ...kernels.qp_kkt_numba import kkt_solve_numba

        assert isinstance(f, KKTFactor)
        dx, dc = kkt_solve_numba(f.L, f.C, f.d, r[:, :n], r[:, n:])
        return torch.cat([dx, dc], dim=-2).permute(2, 0, 1)
    dx, dc = solve_any(f, r[:, :n], r[:, n:])
    return torch.cat([dx, dc], dim=-2).permute(2, 0, 1)


def _solve_lu(e: _Entry, rhs: torch.Tensor) -> torch.Tensor:
    """Exact (unregularized) KKT solve of one entry by the scaled LU, ``rhs (V, B, N)``."""
    LU, piv, sc = e.scaled_lu()
    n, ne, _ = e.sizes
    scale = torch.cat([torch.ones(sc.shape[0], n + ne, dtype=sc.dtype, device=sc.device), sc], -1)
    V = rhs.shape[0]
    r = (rhs * scale).unsqueeze(-1)
    out = torch.linalg.lu_solve(LU.expand(V, *LU.shape), piv.expand(V, *piv.shape), r).squeeze(-1)
    return out * scale


@dataclasses.dataclass(frozen=True)
class KKTSolve(LinearSolver):
    r"""Solve the QP's KKT systems with factorizations of the KKT matrix at the solution.

    Solves :math:`K u = r` for the KKT matrix :math:`K` of :class:`KKTCache` (which is
    :math:`\partial_z F` of :func:`qp_optimality`, and symmetric, so also its transpose) to
    :math:`\lVert Ku - r\rVert \le \text{rtol}\,\lVert r\rVert`. First the regularized Cholesky
    factorization of :mod:`.kkt` with iterative refinement against
    the exact operator; elements that miss the tolerance (strongly and weakly active constraints
    together make that elimination ill-conditioned) are re-solved with a batched LU of the
    symmetrically scaled full KKT matrix, whose entries stay bounded by the data. Both
    factorizations are computed once per :func:`~optlayers.layers.qp` call and reused by every
    adjoint, tangent and second-order solve of that call.

    Args:
        cache: The :class:`KKTCache` filled by the forward solves.
        rtol: Relative residual tolerance (``‖Ku − r‖ ≤ rtol ‖r‖``); None means 1e-10 in float64
            and 1e-4 in float32.
        refine: Most iterative-refinement steps (it stops early once every element converged).
        fallback: Linear solver used when the cached factorizations do not apply (a batch layout
            they cannot be matched to).

    Elements whose forward solve failed (NaN solution) get a zero solution, so they contribute
    zero gradient.

    Example:
        A KKT system at the solution of ``min ½‖x‖² − 1ᵀx s.t. x ≤ ½``, solved with the cached
        factorization and checked against a dense solve:

        >>> import torch
        >>> from optlayers.implicit.linear_solvers import LinearOperator
        >>> from optlayers.solvers.qp import KKTCache, KKTSolve, solve_qp
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.full((2,), 0.5, dtype=torch.float64)
        >>> res = solve_qp(Q, p, G, h)
        >>> cache = KKTCache()
        >>> cache.add(Q[None], torch.zeros(1, 0, 2, dtype=torch.float64), G[None], res.aux.slack[None],
        ...           res.aux.ineq_dual[None], delta=torch.full((1, 1), 1e-8, dtype=torch.float64),
        ...           valid=torch.tensor([True]))
        >>> W = torch.diag(res.aux.slack / res.aux.ineq_dual)
        >>> K = torch.cat([torch.cat([Q, G.T], 1), torch.cat([G, -W], 1)], 0)
        >>> r = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
        >>> out = KKTSolve(cache=cache)(LinearOperator.from_dense(K[None]), r)
        >>> bool(out.converged), torch.allclose(out.solution[0], torch.linalg.solve(K, r[0]))
        (True, True)
    """

    cache: KKTCache = dataclasses.field(default_factory=KKTCache, compare=False, repr=False)
    rtol: float | None = None
    refine: int = 3
    fallback: LinearSolver = dataclasses.field(default_factory=lambda: Dense("lu"))
    ridge: float = 0.0

    def __call__(self, op: LinearOperator, b: torch.Tensor, x0: torch.Tensor | None = None) -> Result:
        rtol = self.rtol if self.rtol is not None else (1e-10 if b.dtype == torch.float64 else 1e-4)
        entries = self.cache.entries
        total = sum(e.B for e in entries)
        if (not entries or total == 0 or op.batch % total != 0
                or any(sum(e.sizes) != op.n for e in entries)
                or any(e.w.dtype != b.dtype for e in entries)):
            return self.fallback(op, b, x0)
        V = op.batch // total
        entry_valid = torch.cat([e.valid for e in entries])
        # Under nested torch.func transforms the vmapped copies are folded into the batch either
        # before (V, total) or after (total, V) the forward batch; the residual check tells which.
        res = None
        for layout in ("copies_outer", "copies_inner") if V > 1 else ("copies_outer",):
            for method in (_solve_cholesky, _solve_lu):
                attempt = self._refined(op, b, entries, V, total, layout, entry_valid, rtol, method)
                res = attempt if res is None else _pick(attempt, res)
                if bool(res.converged.all()):
                    return res
        assert res is not None
        return _pick(self.fallback(op, b, None), res)

    def _refined(self, op: LinearOperator, b: torch.Tensor, entries: list[_Entry], V: int, total: int,
                 layout: str, entry_valid: torch.Tensor, rtol: float, method: Any) -> Result:
        """Cached-factor solve plus refinement for one assumed batch layout."""
        N = op.n

        def to3(r: torch.Tensor) -> torch.Tensor:
            if layout == "copies_outer":
                return r.reshape(V, total, N)
            return r.reshape(total, V, N).transpose(0, 1)

        def from3(r3: torch.Tensor) -> torch.Tensor:
            if layout == "copies_outer":
                return r3.reshape(op.batch, r3.shape[-1])
            return r3.transpose(0, 1).reshape(op.batch, r3.shape[-1])

        valid = from3(entry_valid.view(1, total, 1).expand(V, total, 1)).squeeze(-1)

        def msolve(r: torch.Tensor) -> torch.Tensor:
            r3 = to3(r)
            parts, start = [], 0
            for e in entries:
                part = method(e, r3[:, start:start + e.B])
                parts.append(torch.where(e.valid.unsqueeze(-1), part, torch.zeros_like(part)))
                start += e.B
            return from3(torch.cat(parts, dim=1))

        bz = torch.where(valid.unsqueeze(-1), b, torch.zeros_like(b))
        tol = rtol * torch.linalg.vector_norm(bz, dim=-1)
        u = msolve(bz)
        steps = 1
        r_u: torch.Tensor | None = None  # the residual b − K u of the current u, when known
        for _ in range(self.refine):
            r = bz - op.matvec(u)
            if bool((torch.linalg.vector_norm(r, dim=-1) <= tol).all()):
                r_u = r
                break
            u = u + msolve(r)
            steps += 1
        iters = torch.full((op.batch,), steps, dtype=torch.int64, device=b.device)
        if r_u is None:
            res = finish(u, op, bz, iters, tol)
        else:  # `finish` without recomputing the residual the loop just checked
            res = finish(u, _KnownResidual.wrap(op, u, bz - r_u), bz, iters, tol)
        if not bool(valid.all()):
            # Failed forward elements: zero solution, reported as solved (zero gradient by design).
            res = res.replace(converged=res.converged | ~valid,
                              status=torch.where(valid, res.status, torch.full_like(res.status, int(Status.SUCCESS))))
        return res


class _KnownResidual:
    """An operator whose product with one known vector is already computed (used by ``finish``)."""

    @staticmethod
    def wrap(op: LinearOperator, u: torch.Tensor, Ku: torch.Tensor) -> LinearOperator:
        def matvec(v: torch.Tensor) -> torch.Tensor:
            return Ku if v is u else op.matvec(v)

        return dataclasses.replace(op, matvec=matvec)


def _pick(a: Result, b: Result) -> Result:
    """Per element, the converged one of two results, else the one with the smaller residual."""
    use_a = (a.converged & ~b.converged) | (~b.converged & ~a.converged & (a.residual < b.residual))
    w = use_a.unsqueeze(-1)
    return Result(solution=torch.where(w, a.solution, b.solution),
                  converged=torch.where(use_a, a.converged, b.converged),
                  iterations=a.iterations + b.iterations,
                  residual=torch.where(use_a, a.residual, b.residual), status=torch.where(use_a, a.status, b.status))

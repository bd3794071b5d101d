"""Triton (CUDA) kernels of Sinkhorn's hot loops: the fused online soft-min and transport-apply.

Imported only by the loaders registered in :mod:`optlayers.kernels.softmin` (importing optlayers
never imports Triton). Same signatures and results as the PyTorch reference
(:func:`optlayers.kernels.softmin_reference.softmin_fast` /
:func:`~optlayers.kernels.softmin_reference.kernel_apply_fast`), tested against it under
``TRITON_INTERPRET=1``.

**Soft-min.** One program per ``(problem b, block of BN rows)`` streams over the ``m`` columns in
tiles of ``BM`` and keeps, per row, a running shift ``s`` and a running sum ``S`` (the online
log-sum-exp of FlashAttention):

.. math::
    z_{ij} = (h_j - C_{ij})/\\varepsilon,\\quad s' = \\max(s, \\max_j z_{ij}),\\quad
    S \\leftarrow S\\,e^{s - s'} + \\textstyle\\sum_j e^{z_{ij} - s'},\\qquad
    f_i = -\\varepsilon\\,(\\log S + s).

A non-finite running maximum uses the shift 0 (as ``torch.logsumexp`` does), so rows whose
``h_j`` are all ``−inf`` give ``+inf``, a ``+inf`` entry gives ``−inf`` and NaN propagates. The
cost tile never leaves registers: a stored cost is read with its strides (a transposed view
costs nothing), and for point clouds ``‖x_i − y_j‖²`` is computed from the coordinates held in
registers. For the small dimensions of point clouds (``d ≤ 16``) the coordinate differences cost
the same as norms plus a dot product and have no cancellation (zero on identical points), so
the kernel uses them; tensor-core dots would only pay for large ``d``, where their tf32 error
would have to be weighed against ``ε``. The other direction (over ``i``) is the same kernel with
``x`` and ``y`` swapped. With ``error=`` the epilogue also writes the per-row term of Sinkhorn's
L1 marginal error ``a_i |exp((f_i − λ f^+_i)/ε) − 1|``, so the stopping test costs no extra pass.

**Transport-apply.** ``(K v)_i = Σ_j exp(α_i + β_j − C_ij/ε) v_jk`` with the same tiling; ``Pᵀu``
is the transposed source, and ``Σ_j P_ij (x_i − y_j) = x_i (P1)_i − (P y)_i`` is one call with
``v = [1, y]`` (:func:`optlayers.kernels.softmin.transport_displacement`).

Kernels never define gradients: they run under ``torch.no_grad`` inside the solver loop and the
matrix-free operators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmin_reference import CostSource, DenseSource, PNormSource, SqEuclideanSource

__all__ = ["softmin_triton", "kernel_apply_triton", "MAX_D"]

#: Largest point dimension the register-tiled cost handles.
MAX_D = 64

_DENSE, _SQEUCLID, _PNORM = 0, 1, 2


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (the tests replace it with a NaN-filled one to prove every entry is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _cost_tile(x_tile, y_ptr, c_ptr, b, rows, cols, rmask, cmask, d, syb, sym, syd, scb, scn, scm,
               scale, half_p, KIND: tl.constexpr, D: tl.constexpr, WIDE: tl.constexpr):
    """The ``(BN, BM)`` cost tile for rows ``rows`` and columns ``cols`` of problem ``b``."""
    if KIND == 0:
        ptrs = c_ptr + b * scb + rows[:, None].to(tl.int64) * scn + cols[None, :].to(tl.int64) * scm
        c = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        if WIDE:
            c = c.to(tl.float64)
        else:
            c = c.to(tl.float32)
    else:
        dd = tl.arange(0, D)
        yp = y_ptr + b * syb + cols[:, None].to(tl.int64) * sym + dd[None, :] * syd
        y_tile = tl.load(yp, mask=cmask[:, None] & (dd[None, :] < d), other=0.0)
        if WIDE:
            y_tile = y_tile.to(tl.float64)
        else:
            y_tile = y_tile.to(tl.float32)
        diff = x_tile[:, None, :] - y_tile[None, :, :]
        d2 = tl.sum(diff * diff, axis=2)
        if KIND == 1:
            c = scale * d2
        else:
            pos = d2 > 0
            safe = tl.where(pos, d2, 1.0)
            c = tl.where(pos, scale * tl.exp(half_p * tl.log(safe)), 0.0)
    return c


@triton.jit
def _load_x(x_ptr, b, rows, rmask, d, sxb, sxn, sxd, D: tl.constexpr, WIDE: tl.constexpr):
    dd = tl.arange(0, D)
    xp = x_ptr + b * sxb + rows[:, None].to(tl.int64) * sxn + dd[None, :] * sxd
    x_tile = tl.load(xp, mask=rmask[:, None] & (dd[None, :] < d), other=0.0)
    if WIDE:
        x_tile = x_tile.to(tl.float64)
    else:
        x_tile = x_tile.to(tl.float32)
    return x_tile


@triton.jit
def _softmin_kernel(x_ptr, y_ptr, c_ptr, h_ptr, eps_ptr, out_ptr, fprev_ptr, a_ptr, err_ptr,
                    n, m, d, sxb, sxn, sxd, syb, sym, syd, scb, scn, scm, shb, sob, seb,
                    scale, half_p, lam,
                    KIND: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                    WIDE: tl.constexpr, ERROR: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < n
    if WIDE:
        eps = tl.load(eps_ptr + b).to(tl.float64)
        acc = tl.zeros((BN,), dtype=tl.float64)
        sh = tl.zeros((BN,), dtype=tl.float64)
    else:
        eps = tl.load(eps_ptr + b).to(tl.float32)
        acc = tl.zeros((BN,), dtype=tl.float32)
        sh = tl.zeros((BN,), dtype=tl.float32)
    mx = sh - float("inf")
    x_tile = sh  # placeholder for the dense kind (unused)
    if KIND != 0:
        x_tile = _load_x(x_ptr, b, rows, rmask, d, sxb, sxn, sxd, D, WIDE)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        cmask = cols < m
        h = tl.load(h_ptr + b * shb + cols, mask=cmask, other=0.0).to(eps.dtype)
        c = _cost_tile(x_tile, y_ptr, c_ptr, b, rows, cols, rmask, cmask, d, syb, sym, syd, scb, scn,
                       scm, scale, half_p, KIND, D, WIDE)
        z = (h[None, :] - c) / eps
        z = tl.where(cmask[None, :], z, float("-inf"))
        mx = tl.maximum(mx, tl.max(z, axis=1))
        new_sh = tl.where((mx == float("inf")) | (mx == float("-inf")), 0.0, mx)
        rescale = acc * tl.exp(sh - new_sh)
        acc = tl.where(acc == 0.0, 0.0, rescale) + tl.sum(tl.exp(z - new_sh[:, None]), axis=1)
        sh = new_sh
    # NaN anywhere in the row makes the row NaN (tl.max may drop NaN; the sum keeps it)
    f = -eps * (tl.log(acc) + sh)
    tl.store(out_ptr + b * sob + rows, f.to(out_ptr.dtype.element_ty), mask=rmask)
    if ERROR:
        fp = tl.load(fprev_ptr + b * sob + rows, mask=rmask, other=0.0).to(eps.dtype)
        aw = tl.load(a_ptr + b * seb + rows, mask=rmask, other=0.0).to(eps.dtype)
        term = aw * tl.abs(tl.exp((fp - lam * f) / eps) - 1.0)
        tl.store(err_ptr + b * sob + rows, term.to(err_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, c_ptr, al_ptr, be_ptr, eps_ptr, v_ptr, out_ptr,
                  n, m, d, k, sxb, sxn, sxd, syb, sym, syd, scb, scn, scm, sab, sbb,
                  svb, svm, svk, sob, son, sok, scale, half_p,
                  KIND: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                  BK: tl.constexpr, WIDE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.program_id(2) * BK + tl.arange(0, BK)
    rmask = rows < n
    kmask = ks < k
    if WIDE:
        eps = tl.load(eps_ptr + b).to(tl.float64)
        acc = tl.zeros((BN, BK), dtype=tl.float64)
    else:
        eps = tl.load(eps_ptr + b).to(tl.float32)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
    alpha = tl.load(al_ptr + b * sab + rows, mask=rmask, other=0.0).to(eps.dtype)
    alpha = tl.where(alpha != alpha, float("-inf"), alpha)  # NaN (0 weight, +inf potential) -> no mass
    x_tile = alpha
    if KIND != 0:
        x_tile = _load_x(x_ptr, b, rows, rmask, d, sxb, sxn, sxd, D, WIDE)
    for j0 in range(0, m, BM):
        cols = j0 + tl.arange(0, BM)
        cmask = cols < m
        beta = tl.load(be_ptr + b * sbb + cols, mask=cmask, other=0.0).to(eps.dtype)
        c = _cost_tile(x_tile, y_ptr, c_ptr, b, rows, cols, rmask, cmask, d, syb, sym, syd, scb, scn,
                       scm, scale, half_p, KIND, D, WIDE)
        p = tl.exp(alpha[:, None] + beta[None, :] - c / eps)
        p = tl.where(cmask[None, :], p, 0.0)
        vp = v_ptr + b * svb + cols[:, None].to(tl.int64) * svm + ks[None, :] * svk
        v = tl.load(vp, mask=cmask[:, None] & kmask[None, :], other=0.0).to(eps.dtype)
        acc += tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    op = out_ptr + b * sob + rows[:, None].to(tl.int64) * son + ks[None, :] * sok
    tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])


def _source_args(source: CostSource, like: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, int, float, float]:
    """``(kind, x, y, cost, d, scale, p/2)`` for the kernels (unused tensors are ``like``)."""
    if isinstance(source, DenseSource):
        return _DENSE, like, like, source.cost.detach(), 1, 1.0, 1.0
    if isinstance(source, (SqEuclideanSource, PNormSource)):
        x, y = source.x.detach(), source.y.detach()
        d = x.shape[-1]
        if d > MAX_D:
            raise ValueError(f"the triton soft-min handles points of dimension d <= {MAX_D}, got {d}; "
                             "use backend='reference'")
        if isinstance(source, SqEuclideanSource):
            return _SQEUCLID, x, y, like, d, float(source.scale), 1.0
        return _PNORM, x, y, like, d, float(source.scale), 0.5 * float(source.p)
    raise ValueError(f"the triton kernels take a dense, squared-Euclidean or p-norm cost, got "
                     f"{type(source).__name__}; user costs run on the reference backend")


def _blocks(D: int) -> tuple[int, int]:
    bn = 32
    bm = max(16, min(64, 8192 // (bn * max(D, 1))))
    return bn, bm


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2)) if t.dim() == 3 else (0, 0, 0)


@torch.no_grad()
def softmin_triton(source: CostSource, h: torch.Tensor, eps: torch.Tensor, *,
                   block_elements: int | None = None, error: tuple[torch.Tensor, torch.Tensor, float] | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``−ε log Σ_j exp((h_j − C_ij)/ε)``, ``(B, n)``, as one fused streaming kernel.

    Args:
        source: Dense, squared-Euclidean or p-norm cost source, batch ``B``.
        h: ``(B, m)``; ``−inf`` entries are ignored.
        eps: ``(B,)`` temperatures.
        block_elements: Ignored (the tiling is fixed); accepted for the common signature.
        error: Optional ``(f_prev (B, n), a (B, n), λ)``: also return the L1 marginal error
            ``Σ_i a_i |exp((f_prev_i − λ f_i)/ε) − 1|`` per problem, ``(B,)``, computed in the epilogue.

    Returns:
        ``f (B, n)``, or ``(f, err)`` when ``error`` is given.
    """
    del block_elements
    B, m = h.shape
    n = source.n
    kind, x, y, c, d, scale, half_p = _source_args(source, h)
    wide = h.dtype == torch.float64
    hc = h.detach().contiguous()
    ec = eps.detach().to(h.dtype).reshape(B).contiguous()
    out = _alloc(B, n, dtype=h.dtype, device=h.device)
    D = max(1, triton.next_power_of_2(d))
    bn, bm = _blocks(D if kind != _DENSE else 1)
    if error is not None:
        fprev = error[0].detach().to(h.dtype).contiguous()
        aw = error[1].detach().to(h.dtype).contiguous()
        terms = _alloc(B, n, dtype=h.dtype, device=h.device)
        lam = float(error[2])
    else:
        fprev = aw = terms = out
        lam = 1.0
    if B > 0 and n > 0:
        sx, sy, sc = _strides3(x), _strides3(y), _strides3(c)
        _softmin_kernel[(B, triton.cdiv(n, bn))](
            x, y, c, hc, ec, out, fprev, aw, terms, n, m, d, *sx, *sy, *sc, hc.stride(0), out.stride(0),
            aw.stride(0) if aw.dim() == 2 else 0, scale, half_p, lam,
            KIND=kind, D=D, BN=bn, BM=bm, WIDE=wide, ERROR=error is not None, num_warps=4)
    if error is not None:
        return out, terms.sum(-1)
    return out


@torch.no_grad()
def kernel_apply_triton(source: CostSource, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                        v: torch.Tensor, *, block_elements: int | None = None) -> torch.Tensor:
    """``Σ_j exp(α_i + β_j − C_ij/ε) v_jk``, ``(B, n, k)``, streamed (transport-apply ``P·V``).

    ``NaN`` entries of ``α`` (zero weight with an infinite potential) count as ``−inf``, as in
    :func:`~optlayers.kernels.softmin_reference.kernel_apply_fast`.
    """
    del block_elements
    B, n = alpha.shape
    m, k = v.shape[-2], v.shape[-1]
    kind, x, y, c, d, scale, half_p = _source_args(source, alpha)
    wide = alpha.dtype == torch.float64
    al = alpha.detach().contiguous()
    be = beta.detach().to(alpha.dtype).contiguous()
    ec = eps.detach().to(alpha.dtype).reshape(B).contiguous()
    vv = v.detach().to(alpha.dtype)
    out = _alloc(B, n, k, dtype=alpha.dtype, device=alpha.device)
    D = max(1, triton.next_power_of_2(d))
    bn, bm = _blocks(D if kind != _DENSE else 1)
    bk = min(16, max(1, triton.next_power_of_2(max(k, 1))))
    if bk * bm > 512:
        bm = max(16, 512 // bk)
    if B > 0 and n > 0 and k > 0:
        sx, sy, sc = _strides3(x), _strides3(y), _strides3(c)
        grid = (B, triton.cdiv(n, bn), triton.cdiv(k, bk))
        _apply_kernel[grid](
            x, y, c, al, be, ec, vv, out, n, m, d, k, *sx, *sy, *sc, al.stride(0), be.stride(0),
            vv.stride(0), vv.stride(1), vv.stride(2), out.stride(0), out.stride(1), out.stride(2),
            scale, half_p, KIND=kind, D=D, BN=bn, BM=bm, BK=bk, WIDE=wide, num_warps=4)
    return out


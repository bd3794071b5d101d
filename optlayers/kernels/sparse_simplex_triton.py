"""Triton (CUDA) kernel of the ``k``-sparse simplex projection.

Imported only by the loader registered in :mod:`optlayers.kernels.sparse_simplex` (importing
optlayers never imports Triton). Same signature and result as
:func:`optlayers.kernels.sparse_simplex.sparse_simplex_reference`, up to the order of the ``kk``
slots of a row, which here follow the column index.

One program per row holds the row in registers (``n <= MAX_N``) and never sorts:

1. *selection* (``kk < n``): the entries are mapped to unsigned integers with the order of the
   floats (flip all bits of negatives, the sign bit of the others); the ``kk``-th largest key
   ``T`` is found exactly by bisection over its bits (32 or 64 masked counts); ties at ``T`` are
   admitted in index order (a cumulative sum) so exactly ``kk`` entries are kept;
2. *threshold*: Michelot's finite iteration ``τ ← (Σ_{x_i > τ} x_i − s) / #{x_i > τ}`` over the
   kept entries, started from their mean; the active set only shrinks, so it stops after at
   most ``kk`` (in practice a handful of) masked reductions;
3. *compaction*: kept entry ``i`` goes to slot ``#{kept j < i}`` (an exclusive cumulative sum).

Half precision is computed in float32. Tested on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_simplex import check_kernel_args

__all__ = ["sparse_simplex_triton", "MAX_N"]

#: Largest row length one program handles.
MAX_N = 1 << 15


@triton.jit
def _sparse_simplex_kernel(x_ptr, s_ptr, o_ptr, v_ptr, i_ptr, n, kk, per, stride_x, stride_o, stride_off,
                           BLOCK: tl.constexpr, SELECT: tl.constexpr, WIDE: tl.constexpr,
                           OFFSET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    if WIDE:
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float64)
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    if OFFSET:
        grp = row // per
        x = tl.load(o_ptr + grp * stride_off + offs, mask=valid, other=0.0).to(x.dtype) - x
    s = tl.load(s_ptr + row).to(x.dtype)

    if SELECT:
        # order-preserving unsigned keys
        if WIDE:
            bits = x.to(tl.uint64, bitcast=True)
            one = tl.full((), 1, dtype=tl.uint64)
            top = one << 63
            key = tl.where((bits & top) != 0, ~bits, bits | top)
            key = tl.where(valid, key, tl.zeros_like(key))
            thr = tl.zeros((), dtype=tl.uint64)
            for b in range(64):
                cand = thr | (one << (63 - b))
                cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
                thr = tl.where(cnt >= kk, cand, thr)
        else:
            bits = x.to(tl.uint32, bitcast=True)
            one = tl.full((), 1, dtype=tl.uint32)
            top = one << 31
            key = tl.where((bits & top) != 0, ~bits, bits | top)
            key = tl.where(valid, key, tl.zeros_like(key))
            thr = tl.zeros((), dtype=tl.uint32)
            for b in range(32):
                cand = thr | (one << (31 - b))
                cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
                thr = tl.where(cnt >= kk, cand, thr)
        gt = valid & (key > thr)
        eq = valid & (key == thr)
        allowed = kk - tl.sum(gt.to(tl.int32), axis=0)
        tie_rank = tl.cumsum(eq.to(tl.int32), axis=0) - 1
        keep = gt | (eq & (tie_rank < allowed))
    else:
        keep = valid

    # Michelot's iteration for the simplex threshold of the kept entries
    cnt = tl.sum(keep.to(tl.int32), axis=0)
    tau = (tl.sum(tl.where(keep, x, 0.0), axis=0) - s) / cnt.to(x.dtype)
    prev = cnt + 1
    while cnt < prev:
        prev = cnt
        act = keep & (x > tau)
        c2 = tl.sum(act.to(tl.int32), axis=0)
        t2 = (tl.sum(tl.where(act, x, 0.0), axis=0) - s) / tl.maximum(c2, 1).to(x.dtype)
        tau = tl.where(c2 > 0, t2, tau)
        cnt = tl.where(c2 > 0, c2, cnt)

    vals = tl.maximum(x - tau, 0.0)
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    out = row * stride_o + slot
    tl.store(v_ptr + out, vals.to(v_ptr.dtype.element_ty), mask=keep)
    tl.store(i_ptr + out, offs.to(tl.int64), mask=keep)


def sparse_simplex_triton(x: torch.Tensor, k: int, s: torch.Tensor,
                          offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``-sparse simplex projection of the rows of ``x`` (Triton, one program per row).

    Raises:
        ValueError: invalid arguments (see :func:`check_kernel_args`) or ``n > MAX_N``.
    """
    kk = check_kernel_args(x, k, s, offset)
    R, n = x.shape
    if n > MAX_N:
        raise ValueError(f"the triton sparse-simplex kernel handles rows of at most {MAX_N} entries, got {n}; "
                         "use backend='reference'")
    xc = x.detach().contiguous()
    wide = x.dtype == torch.float64
    sc = s.detach().to(torch.float64 if wide else torch.float32).contiguous()
    values = torch.empty(R, kk, dtype=x.dtype, device=x.device)
    indices = torch.empty(R, kk, dtype=torch.int64, device=x.device)
    if R == 0:
        return values, indices
    oc = xc if offset is None else offset.detach().to(x.dtype).contiguous()
    per = 1 if offset is None else R // offset.shape[0]
    block = max(16, triton.next_power_of_2(n))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _sparse_simplex_kernel[(R,)](xc, sc, oc, values, indices, n, kk, per, xc.stride(0), values.stride(0),
                                 oc.stride(0), BLOCK=block, SELECT=kk < n, WIDE=wide,
                                 OFFSET=offset is not None, num_warps=warps)
    return values, indices

"""Persistent Triton kernel (stretch of issue 10): all Sinkhorn iterations of many small problems
in one launch.

For routing-sized problems (``n, m ≤`` :data:`MAX_SIDE`) a launch per soft-min costs more than the
soft-min itself. Here one program owns one problem ``b`` of the batch: it loads the ``(n, m)``
cost once into registers and runs the balanced log-domain iteration of
:mod:`optlayers.solvers.ot._iterations` to convergence without leaving the kernel:

.. math::
    g_j = -\\varepsilon\\,\\mathrm{LSE}_i\\big((f_i + \\varepsilon\\log a_i - C_{ij})/\\varepsilon\\big),\\qquad
    f^+_i = -\\varepsilon\\,\\mathrm{LSE}_j\\big((g_j + \\varepsilon\\log b_j - C_{ij})/\\varepsilon\\big),

    \\mathrm{err} = \\textstyle\\sum_i a_i\\,\\big|e^{(f_i - f^+_i)/\\varepsilon} - 1\\big|

(after a ``g``-update the columns of ``P(f, g)`` are exact and ``err`` is the L1 error of its
rows). It stops at ``err ≤ tol`` or ``max_iter`` iterations and returns the pair ``(f, g)`` whose
error was measured, the iteration count and the error — the same iterates, stopping rule and
outputs as the solver's ``check_every=1`` path (no annealing, acceleration or unbalanced
marginals), followed by the solver's gauge ``⟨a, f⟩ = ⟨b, g⟩``. The specification is
:func:`optlayers.solvers.ot.sinkhorn` on the same dense costs; the tests compare against it under
``TRITON_INTERPRET=1``.

Not wired into the solver (that lives in ``optlayers/solvers/ot``); call
:func:`sinkhorn_persistent_triton` directly. No gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sinkhorn_persistent_triton", "MAX_SIDE"]

#: Largest ``n`` and ``m`` of one problem (its whole cost stays in one program's registers).
MAX_SIDE = 128


@triton.jit
def _lse_rows(z, mask):
    """Row-wise log-sum-exp of ``z`` over axis 1 (entries outside ``mask`` are ignored)."""
    z = tl.where(mask, z, float("-inf"))
    mx = tl.max(z, axis=1)
    sh = tl.where((mx == float("inf")) | (mx == float("-inf")), 0.0, mx)
    return tl.log(tl.sum(tl.exp(z - sh[:, None]), axis=1)) + sh


@triton.jit
def _lse_cols(z, mask):
    z = tl.where(mask, z, float("-inf"))
    mx = tl.max(z, axis=0)
    sh = tl.where((mx == float("inf")) | (mx == float("-inf")), 0.0, mx)
    return tl.log(tl.sum(tl.exp(z - sh[None, :]), axis=0)) + sh


@triton.jit
def _persistent_kernel(c_ptr, loga_ptr, logb_ptr, eps_ptr, f_ptr, g_ptr, it_ptr, err_ptr,
                       n, m, scb, scn, scm, max_iter, tol,
                       BN: tl.constexpr, BM: tl.constexpr, WIDE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BM)
    rmask = rows < n
    cmask = cols < m
    mask = rmask[:, None] & cmask[None, :]
    c = tl.load(c_ptr + b * scb + rows[:, None].to(tl.int64) * scn + cols[None, :].to(tl.int64) * scm,
                mask=mask, other=0.0)
    if WIDE:
        c = c.to(tl.float64)
        eps = tl.load(eps_ptr + b).to(tl.float64)
    else:
        c = c.to(tl.float32)
        eps = tl.load(eps_ptr + b).to(tl.float32)
    loga = tl.load(loga_ptr + b * n + rows, mask=rmask, other=0.0).to(c.dtype)
    logb = tl.load(logb_ptr + b * m + cols, mask=cmask, other=0.0).to(c.dtype)
    a = tl.where(rmask, tl.exp(loga), 0.0)
    f = tl.zeros((BN,), dtype=c.dtype)
    # padded lanes are held at 0 so that they never produce inf - inf
    g = tl.where(cmask, -eps * _lse_cols((f[:, None] + eps * loga[:, None] - c) / eps, mask), 0.0)
    f_new = tl.where(rmask, -eps * _lse_rows((g[None, :] + eps * logb[None, :] - c) / eps, mask), 0.0)
    err = tl.sum(tl.where(rmask, a * tl.abs(tl.exp((f - f_new) / eps) - 1.0), 0.0), axis=0)
    it = 1
    while (it < max_iter) & (err > tol):
        f = f_new
        g = tl.where(cmask, -eps * _lse_cols((f[:, None] + eps * loga[:, None] - c) / eps, mask), 0.0)
        f_new = tl.where(rmask, -eps * _lse_rows((g[None, :] + eps * logb[None, :] - c) / eps, mask), 0.0)
        err = tl.sum(tl.where(rmask, a * tl.abs(tl.exp((f - f_new) / eps) - 1.0), 0.0), axis=0)
        it += 1
    tl.store(f_ptr + b * n + rows, f.to(f_ptr.dtype.element_ty), mask=rmask)
    tl.store(g_ptr + b * m + cols, g.to(g_ptr.dtype.element_ty), mask=cmask)
    tl.store(it_ptr + b, it)
    tl.store(err_ptr + b, err.to(err_ptr.dtype.element_ty))


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (the tests replace it with a NaN-filled one to prove every entry is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@torch.no_grad()
def sinkhorn_persistent_triton(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: torch.Tensor, *,
                               tol: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Balanced log-domain Sinkhorn of a batch of small dense problems, one program per problem.

    Args:
        C: ``(B, n, m)`` costs, ``n, m ≤`` :data:`MAX_SIDE` (any strides).
        a: ``(B, n)`` positive source weights; b: ``(B, m)`` target weights of the same mass.
        eps: ``(B,)`` temperatures.
        tol: L1 marginal error at which a problem stops.
        max_iter: Iteration limit (each iteration: one ``g``- and one ``f``-soft-min).

    Returns:
        ``(f (B, n), g (B, m), iterations (B,) int32, error (B,))``: the potentials whose error was
        measured, gauge-normalized so that ``⟨a, f⟩ = ⟨b, g⟩``.

    Raises:
        ValueError: shapes disagree, a side exceeds :data:`MAX_SIDE`, or ``max_iter < 1``.
    """
    if C.dim() != 3:
        raise ValueError(f"C must be (B, n, m), got shape {tuple(C.shape)}")
    B, n, m = C.shape
    if a.shape != (B, n) or b.shape != (B, m) or eps.reshape(-1).shape != (B,):
        raise ValueError(f"a must be (B, n) = {(B, n)}, b (B, m) = {(B, m)} and eps (B,); got "
                         f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(eps.shape)}")
    if max(n, m) > MAX_SIDE or min(n, m) < 1:
        raise ValueError(f"C: the persistent kernel takes 1 ≤ n, m ≤ {MAX_SIDE}, got n={n}, m={m}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    wide = C.dtype == torch.float64
    wd = torch.float64 if wide else torch.float32
    dev = C.device
    loga = torch.log(a.to(wd)).contiguous()
    logb = torch.log(b.to(wd)).contiguous()
    e = eps.reshape(B).to(wd).contiguous()
    f = _alloc(B, n, dtype=wd, device=dev)
    g = _alloc(B, m, dtype=wd, device=dev)
    its = _alloc(B, dtype=torch.int32, device=dev)
    err = _alloc(B, dtype=wd, device=dev)
    if B:
        BN = max(16, triton.next_power_of_2(n))
        BM = max(16, triton.next_power_of_2(m))
        _persistent_kernel[(B,)](C, loga, logb, e, f, g, its, err, n, m, C.stride(0), C.stride(1), C.stride(2),
                                 int(max_iter), float(tol), BN=BN, BM=BM, WIDE=wide)
    aw, bw = a.to(wd), b.to(wd)
    shift = ((bw * g).sum(-1) - (aw * f).sum(-1)) / (aw.sum(-1) + bw.sum(-1))
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    dt = C.dtype if C.dtype.is_floating_point else wd
    return (f + shift[:, None]).to(dt), (g - shift[:, None]).to(dt), its, err.to(dt)

"""Blockwise soft-min: the hot loop of Sinkhorn, in plain PyTorch (the reference backend).

For a cost ``C`` of shape ``(B, n, m)`` (given block by block, never as a whole), a vector
``h`` of shape ``(B, m)`` and temperatures ``ε`` of shape ``(B,)``, the soft-min over the last
axis is

.. math:: \\operatorname{softmin}_\\varepsilon(C - h)_i
          = -\\varepsilon \\log \\sum_j \\exp\\big((h_j - C_{ij})/\\varepsilon\\big),

and the kernel application is

.. math:: (K v)_i = \\sum_j \\exp\\big(\\alpha_i + \\beta_j - C_{ij}/\\varepsilon\\big) v_j .

Both stream over row blocks of ``C``: memory is ``O(block · m)``, never ``O(n · m)``.

Two implementations live here and must agree (the tests compare them):

* :func:`softmin_reference` / :func:`kernel_apply_reference` — the specification: out-of-place,
  differentiable (autograd and ``torch.func`` transforms go through them), written for clarity.
* :func:`softmin_fast` / :func:`kernel_apply_fast` — the eager CPU/GPU fast path used by the
  solver's loop under ``torch.no_grad()``: one preallocated block buffer, in-place ops, and for
  squared-Euclidean point clouds the exponent ``(h_j - s‖x_i - y_j‖²)/ε`` computed by one batched
  GEMM on augmented coordinates (as in FlashSinkhorn). A Triton or Numba kernel replaces these
  through ``optlayers.kernels`` dispatch; this module is what it is tested against.

A *cost source* tells the functions how to produce cost blocks:

* :class:`DenseSource` — a stored ``(B, n, m)`` matrix.
* :class:`SqEuclideanSource` — ``s‖x_i − y_j‖²`` from points.
* :class:`PNormSource` — ``s‖x_i − y_j‖^p`` from points.
* :class:`CallableSource` — ``fn(x_block, y)`` for a user cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

__all__ = [
    "CostSource",
    "DenseSource",
    "SqEuclideanSource",
    "PNormSource",
    "CallableSource",
    "softmin_reference",
    "kernel_apply_reference",
    "softmin_fast",
    "kernel_apply_fast",
    "block_rows",
    "BLOCK_ELEMENTS",
]

#: Target number of entries of one cost block (``B · rows · m``): about 1 MiB in float32,
#: so a block stays in the L2 cache while it is visited several times.
BLOCK_ELEMENTS = 1 << 18


def block_rows(batch: int, n: int, m: int, block_elements: int | None = None) -> int:
    """Number of rows per block so that a ``(batch, rows, m)`` block has ~``block_elements``."""
    target = BLOCK_ELEMENTS if block_elements is None else block_elements
    return max(1, min(n, target // max(1, batch * m)))


class CostSource:
    """Produces blocks of a ``(B, n, m)`` cost matrix; subclasses define :meth:`block`."""

    n: int
    m: int

    def block(self, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` of the cost, shape ``(B, i1 - i0, m)`` (differentiable)."""
        raise NotImplementedError

    def transpose(self) -> CostSource:
        """The source of ``Cᵀ`` (shape ``(B, m, n)``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DenseSource(CostSource):
    """A stored cost matrix ``C`` of shape ``(B, n, m)``."""

    cost: torch.Tensor

    @property
    def n(self) -> int:  # type: ignore[override]
        return self.cost.shape[-2]

    @property
    def m(self) -> int:  # type: ignore[override]
        return self.cost.shape[-1]

    def block(self, i0: int, i1: int) -> torch.Tensor:
        return self.cost[:, i0:i1, :]

    def transpose(self) -> DenseSource:
        return DenseSource(self.cost.transpose(-1, -2))


def _sqdist_block(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact ``‖x_i − y_j‖²`` for ``x (B, r, d)``, ``y (B, m, d)`` (zero on identical points)."""
    d = x.shape[-1]
    if d > 8:
        diff = x.unsqueeze(-2) - y.unsqueeze(-3)
        return (diff * diff).sum(-1)
    # one coordinate at a time: no (B, r, m, d) temporary
    out = (x[..., :, None, 0] - y[..., None, :, 0]).square()
    inplace = not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
    for k in range(1, d):
        t = (x[..., :, None, k] - y[..., None, :, k]).square()
        out = out.add_(t) if inplace else out + t
    return out


@dataclasses.dataclass(frozen=True)
class SqEuclideanSource(CostSource):
    """``C_ij = scale · ‖x_i − y_j‖²`` for ``x (B, n, d)``, ``y (B, m, d)``."""

    x: torch.Tensor
    y: torch.Tensor
    scale: float = 1.0

    @property
    def n(self) -> int:  # type: ignore[override]
        return self.x.shape[-2]

    @property
    def m(self) -> int:  # type: ignore[override]
        return self.y.shape[-2]

    def block(self, i0: int, i1: int) -> torch.Tensor:
        return self.scale * _sqdist_block(self.x[:, i0:i1], self.y)

    def transpose(self) -> SqEuclideanSource:
        return SqEuclideanSource(self.y, self.x, self.scale)


def _safe_pow(d2: torch.Tensor, p: float) -> torch.Tensor:
    """``d2^(p/2)`` with a zero (sub)gradient at ``d2 = 0`` (no NaN for ``p ≤ 2``)."""
    pos = d2 > 0
    safe = torch.where(pos, d2, torch.ones_like(d2))
    return torch.where(pos, safe.pow(0.5 * p), torch.zeros_like(d2))


@dataclasses.dataclass(frozen=True)
class PNormSource(CostSource):
    """``C_ij = scale · ‖x_i − y_j‖₂^p``."""

    x: torch.Tensor
    y: torch.Tensor
    p: float
    scale: float = 1.0

    @property
    def n(self) -> int:  # type: ignore[override]
        return self.x.shape[-2]

    @property
    def m(self) -> int:  # type: ignore[override]
        return self.y.shape[-2]

    def block(self, i0: int, i1: int) -> torch.Tensor:
        return self.scale * _safe_pow(_sqdist_block(self.x[:, i0:i1], self.y), self.p)

    def transpose(self) -> PNormSource:
        return PNormSource(self.y, self.x, self.p, self.scale)


@dataclasses.dataclass(frozen=True)
class CallableSource(CostSource):
    """``C = fn(x, y)`` evaluated block by block: ``fn(x (B, r, d), y (B, m, d)) -> (B, r, m)``."""

    x: torch.Tensor
    y: torch.Tensor
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    transposed: bool = False

    @property
    def n(self) -> int:  # type: ignore[override]
        return (self.y if self.transposed else self.x).shape[-2]

    @property
    def m(self) -> int:  # type: ignore[override]
        return (self.x if self.transposed else self.y).shape[-2]

    def block(self, i0: int, i1: int) -> torch.Tensor:
        if self.transposed:
            return self.fn(self.x, self.y[:, i0:i1]).transpose(-1, -2)
        return self.fn(self.x[:, i0:i1], self.y)

    def transpose(self) -> CallableSource:
        return dataclasses.replace(self, transposed=not self.transposed)


# ----------------------------------------------------------------------------------------------
# Reference (differentiable) implementations.
# ----------------------------------------------------------------------------------------------


def softmin_reference(source: CostSource, h: torch.Tensor, eps: torch.Tensor, *,
                      block_elements: int | None = None) -> torch.Tensor:
    """``−ε log Σ_j exp((h_j − C_ij)/ε)`` over the last axis of ``C``, block by block.

    Args:
        source: Cost blocks, ``(B, n, m)``.
        h: ``(B, m)``; ``−inf`` entries (zero weights, padding) are ignored.
        eps: ``(B,)`` positive temperatures.
        block_elements: Target block size in entries.

    Returns:
        ``(B, n)``. Rows where every ``h_j`` is ``−inf`` give ``+inf``.
    """
    B, n, m = h.shape[0], source.n, source.m
    rows = block_rows(B, n, m, block_elements)
    e = eps[:, None, None]
    outs = []
    for i0 in range(0, n, rows):
        c = source.block(i0, min(n, i0 + rows))
        outs.append(torch.logsumexp((h[:, None, :] - c) / e, dim=-1))
    return -eps[:, None] * torch.cat(outs, dim=1)


def kernel_apply_reference(source: CostSource, alpha: torch.Tensor, beta: torch.Tensor,
                           eps: torch.Tensor, v: torch.Tensor, *,
                           block_elements: int | None = None) -> torch.Tensor:
    """``Σ_j exp(α_i + β_j − C_ij/ε) v_jk``, block by block (differentiable).

    Args:
        source: Cost blocks, ``(B, n, m)``.
        alpha: ``(B, n)``; beta: ``(B, m)`` (``−inf`` allowed).
        eps: ``(B,)``.
        v: ``(B, m, k)``.

    Returns:
        ``(B, n, k)``.
    """
    B, n, m = alpha.shape[0], source.n, source.m
    rows = block_rows(B, n, m, block_elements)
    e = eps[:, None, None]
    outs = []
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        c = source.block(i0, i1)
        k = torch.exp(alpha[:, i0:i1, None] + beta[:, None, :] - c / e)
        outs.append(k @ v)
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------
# Fast eager path (no autograd): preallocated block buffer, in-place operations.
# ----------------------------------------------------------------------------------------------


def _exponent_block(source: CostSource, h: torch.Tensor, eps: torch.Tensor, i0: int, i1: int,
                    out: torch.Tensor, aug: tuple[torch.Tensor, torch.Tensor] | None,
                    d2aug: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Write ``(h_j − C_ij)/ε`` for rows ``i0:i1`` into ``out`` (in place) and return it.

    For squared-Euclidean sources the row-constant term ``−s‖x_i‖²/ε`` is left out (it is added
    back by the caller through ``row_shift``).
    """
    if aug is not None:
        xa, ya = aug
        torch.bmm(xa[:, i0:i1], ya.transpose(-1, -2), out=out)
        return out
    if isinstance(source, DenseSource):
        c = source.cost[:, i0:i1, :]
        if eps.shape[0] == 1:
            torch.add(h[:, None, :] / eps[0], c, alpha=-1.0 / float(eps[0]), out=out)
        else:
            torch.sub(h[:, None, :], c, out=out)
            out.div_(eps[:, None, None])
        return out
    if isinstance(source, PNormSource):
        xa, ya = d2aug if d2aug is not None else _sqdist_aug(source.x, source.y)
        torch.bmm(xa[:, i0:i1], ya.transpose(-1, -2), out=out)
        out.clamp_min_(0)
        if source.p == 1.0:
            out.sqrt_()
        elif source.p != 2.0:
            out.pow_(0.5 * source.p)
        out.mul_(-source.scale)
    else:
        out.copy_(source.block(i0, i1)).mul_(-1.0)
    out.add_(h[:, None, :])
    out.div_(eps[:, None, None])
    return out


def _sqdist_aug(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented coordinates with ``[x, 1, |x|²]·[−2y, |y|², 1] = ‖x − y‖²``."""
    one_x = torch.ones_like(x[..., :1])
    one_y = torch.ones_like(y[..., :1])
    xa = torch.cat([x, one_x, (x * x).sum(-1, keepdim=True)], dim=-1)
    ya = torch.cat([-2.0 * y, (y * y).sum(-1, keepdim=True), one_y], dim=-1)
    return xa, ya


def _sqeuclid_aug(source: SqEuclideanSource, h: torch.Tensor,
                  eps: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Augmented coordinates so that ``x̃_i·ỹ_j = (h_j − s‖x_i − y_j‖²)/ε + s‖x_i‖²/ε``.

    Returns the pair and the row shift ``−s‖x_i‖²/ε`` to add back after the reduction. The
    clouds are centred first (the cost is translation invariant), which limits cancellation.
    """
    x, y, s = source.x, source.y, source.scale
    center = 0.5 * (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True))
    x = x - center
    y = y - center
    e = eps[:, None, None]
    xa = torch.cat([(2.0 * s) * x / e, torch.ones_like(x[..., :1])], dim=-1)
    ya = torch.cat([y, ((h - s * (y * y).sum(-1)) / eps[:, None])[..., None]], dim=-1)
    row_shift = -s * (x * x).sum(-1) / eps[:, None]
    return (xa.contiguous(), ya.contiguous()), row_shift


@torch.no_grad()
def softmin_fast(source: CostSource, h: torch.Tensor, eps: torch.Tensor, *,
                 block_elements: int | None = None) -> torch.Tensor:
    """Same as :func:`softmin_reference`, without autograd, with one reused block buffer."""
    B, n, m = h.shape[0], source.n, source.m
    rows = block_rows(B, n, m, block_elements)
    buf = torch.empty(B, rows, m, dtype=h.dtype, device=h.device)
    out = torch.empty(B, n, dtype=h.dtype, device=h.device)
    aug = d2aug = None
    row_shift = None
    if isinstance(source, SqEuclideanSource):
        aug, row_shift = _sqeuclid_aug(source, h, eps)
    elif isinstance(source, PNormSource):
        d2aug = _sqdist_aug(source.x, source.y)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        blk = _exponent_block(source, h, eps, i0, i1, buf[:, : i1 - i0], aug, d2aug)
        mx = blk.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        blk.sub_(mx).exp_()
        out[:, i0:i1] = blk.sum(-1).log_().add_(mx[..., 0])
    if row_shift is not None:
        out.add_(row_shift)
    return out.mul_(-eps[:, None])


@torch.no_grad()
def kernel_apply_fast(source: CostSource, alpha: torch.Tensor, beta: torch.Tensor,
                      eps: torch.Tensor, v: torch.Tensor, *,
                      block_elements: int | None = None) -> torch.Tensor:
    """Same as :func:`kernel_apply_reference`, without autograd."""
    B, n, m = alpha.shape[0], source.n, source.m
    rows = block_rows(B, n, m, block_elements)
    buf = torch.empty(B, rows, m, dtype=alpha.dtype, device=alpha.device)
    out = torch.empty(B, n, v.shape[-1], dtype=alpha.dtype, device=alpha.device)
    h = beta * eps[:, None]
    aug = d2aug = None
    row_shift = torch.zeros_like(alpha)
    if isinstance(source, SqEuclideanSource):
        aug, row_shift = _sqeuclid_aug(source, h, eps)
    elif isinstance(source, PNormSource):
        d2aug = _sqdist_aug(source.x, source.y)
    shift = alpha + row_shift
    shift = torch.where(torch.isnan(shift), torch.full_like(shift, -math.inf), shift)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        blk = _exponent_block(source, h, eps, i0, i1, buf[:, : i1 - i0], aug, d2aug)
        blk.add_(shift[:, i0:i1, None]).exp_()
        torch.bmm(blk, v, out=out[:, i0:i1])
    return out

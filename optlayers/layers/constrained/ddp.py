"""Keeping Lagrange multipliers identical on every rank under ``torch.distributed``.

Under DDP each rank sees its own mini-batch. :class:`~optlayers.layers.constrained.ConstrainedOptimizer`
keeps the multipliers identical on every rank without ever all-reducing a (sparse) multiplier
gradient:

* **global (dense) constraints** — the strict violation (and, for penalty formulations, the
  detached proxy violation) is averaged over ranks before the dual step, so every rank applies
  the same update to the same multipliers. With equal per-rank batch sizes and violations that
  are batch means, this equals the single-process step on the concatenated batch.
* **indexed (per-sample) constraints** — the observed ``(index, violation)`` pairs are
  all-gathered (dense tensors, padded to the largest rank), and every rank applies the union.

The primal gradients are averaged by DDP itself. Model-predicted multipliers are not
synchronised (their parameters would need their own DDP wrapper).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["resolve_group", "all_reduce_mean", "all_gather_indexed", "check_synchronized"]


def resolve_group(process_group: Any) -> Any:
    """``process_group`` → a group to synchronise over, or None for single-process runs.

    ``"auto"`` means the default group when ``torch.distributed`` is initialized with more than
    one rank; ``None`` disables synchronisation; a group object is used as is.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"unknown process_group {process_group!r}; valid values: 'auto', None or a group")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    return process_group


def all_reduce_mean(t: Tensor, group: Any) -> Tensor:
    """The mean of ``t`` over the ranks of ``group`` (a new tensor; ``t`` is untouched)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)


def all_gather_indexed(indices: Tensor, values: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """All-gather ``(indices (b,), values (b, *s))`` pairs of different lengths from every rank."""
    world = dist.get_world_size(group)
    n = torch.tensor([indices.numel()], device=indices.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in sizes]
    big = max(counts)
    pad_i = indices.new_full((big,), -1)
    pad_i[: indices.numel()] = indices
    pad_v = values.new_zeros((big,) + tuple(values.shape[1:]))
    pad_v[: values.shape[0]] = values.detach()
    gi = [torch.empty_like(pad_i) for _ in range(world)]
    gv = [torch.empty_like(pad_v) for _ in range(world)]
    dist.all_gather(gi, pad_i, group=group)
    dist.all_gather(gv, pad_v, group=group)
    idx = torch.cat([g[:k] for g, k in zip(gi, counts, strict=False)])
    val = torch.cat([g[:k] for g, k in zip(gv, counts, strict=False)])
    return idx, val


def check_synchronized(module: nn.Module, group: Any = None, *, atol: float = 0.0) -> None:
    """Raise ``RuntimeError`` if any buffer of ``module`` (multipliers, penalties) differs across ranks.

    Checks ``max_ranks(b) − min_ranks(b) ≤ atol`` entrywise for every floating-point buffer ``b``
    (entries that are infinite on some rank are skipped), with two all-reduces per buffer.

    Args:
        module: A module whose buffers should agree on every rank (a ``ConstrainedProblem``).
        group: Process group (default: the world).
        atol: Largest allowed gap.

    Raises:
        RuntimeError: Naming the first buffer that differs and by how much.

    Example:
        In a (single-rank) process group:

        >>> import torch
        >>> import torch.distributed as dist
        >>> from optlayers.layers.constrained import Constraint, check_synchronized
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> check_synchronized(Constraint("ineq", shape=(3,))) is None  # in sync: returns quietly
        True
        >>> dist.destroy_process_group()
    """
    for name, buf in module.named_buffers():
        if not buf.is_floating_point() or buf.numel() == 0:
            continue
        hi, lo = buf.detach().clone(), buf.detach().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        finite = torch.isfinite(hi) & torch.isfinite(lo)
        gap = torch.where(finite, hi - lo, torch.zeros_like(hi)).abs().max()
        if float(gap) > atol:
            raise RuntimeError(f"buffer {name!r} differs across ranks by {float(gap):.3e}")

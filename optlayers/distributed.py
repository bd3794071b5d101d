"""``torch.distributed`` helpers shared by the layers (DRO losses, Lagrangian methods, experts).

All collectives here work on *detached* tensors and define no autograd rule: layers that need
global quantities (worst-case weights over the global batch, group sums, multipliers) compute
them from gathered detached values identically on every rank and backpropagate only through
their local share, which avoids the classic gradient bugs of autograd-aware gathers
(unreduced or mis-scaled backward passes).

Every function accepts ``group=None`` meaning the default (world) group and works on any
backend whose device matches the tensors (``gloo`` for CPU tensors, ``nccl`` for CUDA).
When ``torch.distributed`` is not initialised they act as a world of size 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "resolve_group",
    "all_gather_with_sizes",
    "all_reduce_sum",
    "local_offset",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and initialised.

    Example:
        >>> from optlayers.distributed import is_distributed
        >>> is_distributed()  # no process group was initialised in this process
        False
    """
    return dist.is_available() and dist.is_initialized()


def resolve_group(group: Any) -> Any:
    """Map ``"world"`` (or ``dist.group.WORLD``) to the default group; pass others through.

    Raises:
        ValueError: A string other than ``"world"``.

    Example:
        >>> from optlayers.distributed import resolve_group
        >>> resolve_group("world") is None  # not distributed: the world is this process alone
        True
        >>> resolve_group("ranks")
        Traceback (most recent call last):
            ...
        ValueError: process_group must be a ProcessGroup, None or 'world', got 'ranks'
    """
    if isinstance(group, str):
        if group.lower() != "world":
            raise ValueError(f"process_group must be a ProcessGroup, None or 'world', got {group!r}")
        return dist.group.WORLD if is_distributed() else None
    return group


def world_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed).

    Example:
        >>> from optlayers.distributed import world_size
        >>> world_size()
        1
    """
    if not is_distributed():
        return 1
    return dist.get_world_size(resolve_group(group))


def rank(group: Any = None) -> int:
    """Rank of this process in ``group`` (0 when not distributed).

    Example:
        >>> from optlayers.distributed import rank
        >>> rank()
        0
    """
    if not is_distributed():
        return 0
    return dist.get_rank(resolve_group(group))


def all_gather_with_sizes(tensor: Tensor, *, dim: int = 0, group: Any = None) -> tuple[Tensor, list[int]]:
    """All-gather tensors whose size along ``dim`` differs between ranks (no autograd).

    Sizes are exchanged first, every rank pads to the largest, and the padding is removed
    after the gather, so the result is the rank-ordered concatenation along ``dim``.

    Args:
        tensor: The local tensor; all other dimensions must agree across ranks.
        dim: The dimension along which local sizes may differ.
        group: Process group (None: the default group).

    Returns:
        ``(gathered, sizes)``: the concatenation (detached) and each rank's size along ``dim``.

    With ranks ``r = 0, …, R − 1`` holding ``x_r`` of size ``n_r`` along ``dim``, the result is
    ``concat(x_0, …, x_{R−1})`` of size ``Σ_r n_r``, identical on every rank, and
    ``sizes = [n_0, …, n_{R−1}]``.

    Example:
        Outside a process group the world is this process alone:

        >>> import torch
        >>> from optlayers.distributed import all_gather_with_sizes
        >>> x = torch.arange(6.0, requires_grad=True).reshape(3, 2)
        >>> gathered, sizes = all_gather_with_sizes(x, dim=0)
        >>> gathered.shape, sizes, gathered.requires_grad
        (torch.Size([3, 2]), [3], False)
    """
    t = tensor.detach()
    if not is_distributed():
        return t, [t.shape[dim]]
    g = resolve_group(group)
    ws = dist.get_world_size(g)
    t = t.movedim(dim, 0).contiguous()
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes_t = [torch.zeros_like(size) for _ in range(ws)]
    dist.all_gather(sizes_t, size, group=g)
    sizes = [int(s.item()) for s in sizes_t]
    m = max(sizes)
    if t.shape[0] < m:
        pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        t = torch.cat([t, pad], 0)
    bufs = [torch.empty_like(t) for _ in range(ws)]
    dist.all_gather(bufs, t, group=g)
    out = torch.cat([b[:s] for b, s in zip(bufs, sizes, strict=True)], 0)
    return out.movedim(0, dim), sizes


def all_reduce_sum(tensor: Tensor, *, group: Any = None) -> Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (a new detached tensor): ``Σ_r x_r``.

    Example:
        >>> import torch
        >>> from optlayers.distributed import all_reduce_sum
        >>> x = torch.tensor([1.0, 2.0])
        >>> s = all_reduce_sum(x)  # a world of one rank: a copy
        >>> s, s is x
        (tensor([1., 2.]), False)
    """
    t = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=resolve_group(group))
    return t


def local_offset(sizes: list[int], rank_: int) -> int:
    """Start of rank ``rank_``'s slice in a rank-ordered concatenation of pieces of ``sizes``.

    That is ``Σ_{r < rank_} sizes[r]``; rank ``rank_`` owns rows ``[offset, offset + sizes[rank_])``.

    Example:
        >>> from optlayers.distributed import local_offset
        >>> local_offset([3, 5, 2], 2)
        8
    """
    return int(sum(sizes[:rank_]))

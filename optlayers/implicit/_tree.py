"""Pytree helpers: flat views of solutions and parameters.

Solutions ``z`` (a tensor or a pytree of tensors sharing ``batch_ndim`` leading dimensions) are
handled internally as one flat ``(B, n)`` tensor; parameters are split into the floating-point
tensor leaves (differentiated) and everything else (passed through unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["Layout", "ParamTree", "is_float_tensor"]


def is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


class Layout:
    """The shape of a solution pytree with ``batch_ndim`` leading batch dimensions.

    Converts between the user's pytree and the flat ``(B, n)`` view used by solvers.
    """

    def __init__(self, example: Any, batch_ndim: int, name: str = "z0") -> None:
        leaves, self.spec = pytree.tree_flatten(example)
        if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
            raise ValueError(f"{name} must be a tensor or a pytree of tensors")
        if not all(is_float_tensor(x) for x in leaves):
            raise ValueError(f"{name} must be floating point, got dtypes {[x.dtype for x in leaves]}")
        if batch_ndim < 0:
            raise ValueError(f"batch_ndim must be >= 0, got {batch_ndim}")
        for x in leaves:
            if x.dim() < batch_ndim:
                raise ValueError(
                    f"{name} has a leaf of shape {tuple(x.shape)} with fewer than batch_ndim="
                    f"{batch_ndim} dimensions")
        self.batch_ndim = batch_ndim
        self.batch_shape = tuple(leaves[0].shape[:batch_ndim])
        for x in leaves:
            if tuple(x.shape[:batch_ndim]) != self.batch_shape:
                raise ValueError(
                    f"every leaf of {name} must share the batch shape {self.batch_shape} "
                    f"(batch_ndim={batch_ndim}); got {tuple(x.shape)}")
        self.event_shapes = [tuple(x.shape[batch_ndim:]) for x in leaves]
        self.sizes = [math.prod(s) for s in self.event_shapes]
        self.n = sum(self.sizes)
        self.B = math.prod(self.batch_shape)
        self.dtype = leaves[0].dtype

    def to_flat(self, z: Any) -> torch.Tensor:
        """Pytree (batch shape leading) -> ``(B, n)``."""
        leaves = pytree.tree_leaves(z)
        flat = [x.reshape(self.B, -1) for x in leaves]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def from_flat(self, v: torch.Tensor) -> Any:
        """``(B, n)`` -> pytree with the batch shape leading."""
        parts = [v] if len(self.sizes) == 1 else list(torch.split(v, self.sizes, dim=-1))
        leaves = [p.reshape((*self.batch_shape, *s)) for p, s in zip(parts, self.event_shapes)]
        return pytree.tree_unflatten(leaves, self.spec)

    def unflatten_batch(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)`` -> batch shape."""
        return t.reshape(self.batch_shape)


class ParamTree:
    """Split ``params`` (a tuple of pytrees) into tensor leaves and static leaves."""

    def __init__(self, params: Sequence[Any]) -> None:
        leaves, self.spec = pytree.tree_flatten(tuple(params))
        self.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self.static = [None if t else x for x, t in zip(leaves, self.is_tensor)]
        self.tensors = [x for x, t in zip(leaves, self.is_tensor) if t]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        it = iter(tensors)
        leaves = [next(it) if t else s for s, t in zip(self.static, self.is_tensor)]
        return pytree.tree_unflatten(leaves, self.spec)

"""Flat adapters of user functions (pytree ``z`` with batch dims <-> ``(B, n)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._frontend import UserFn
from ._tree import Layout, ParamTree


def same_shape(fn: Callable[..., Any], layout: Layout, ptree: ParamTree, what: str) -> UserFn:
    """``fn(z, *params)`` returning the structure of ``z`` -> flat ``(B, n) -> (B, n)``."""

    def flat(zf: torch.Tensor, *leaves: Any) -> torch.Tensor:
        out = fn(layout.from_flat(zf), *ptree.rebuild(leaves))
        try:
            return layout.to_flat(out)
        except (RuntimeError, AttributeError) as err:
            raise ValueError(f"{what} must return the structure and shape of z (batch shape "
                             f"{layout.batch_shape}, event shapes {layout.event_shapes})") from err

    return UserFn(flat)


def per_element(fn: Callable[..., Any], layout: Layout, ptree: ParamTree, what: str) -> UserFn:
    """``fn(z, *params)`` returning one value per batch element -> flat ``(B, n) -> (B,)``."""

    def flat(zf: torch.Tensor, *leaves: Any) -> torch.Tensor:
        out = fn(layout.from_flat(zf), *ptree.rebuild(leaves))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != layout.batch_shape:
            shape = None if not isinstance(out, torch.Tensor) else tuple(out.shape)
            raise ValueError(f"{what} must return a tensor of the batch shape {layout.batch_shape} "
                             f"(a scalar when batch_ndim=0), got shape {shape}")
        return out.reshape(zf.shape[0])

    return UserFn(flat)


def rows(fn: Callable[..., Any], layout: Layout, ptree: ParamTree, what: str) -> UserFn:
    """``fn(z, *params)`` returning ``(*batch, *m)`` -> flat ``(B, n) -> (B, m)``."""

    def flat(zf: torch.Tensor, *leaves: Any) -> torch.Tensor:
        out = fn(layout.from_flat(zf), *ptree.rebuild(leaves))
        if not isinstance(out, torch.Tensor) or tuple(out.shape[:layout.batch_ndim]) != layout.batch_shape:
            raise ValueError(f"{what} must return a tensor whose leading dimensions are the batch "
                             f"shape {layout.batch_shape}")
        return out.reshape(zf.shape[0], -1)

    return UserFn(flat)


def with_step(fn: Callable[..., Any], layout: Layout, ptree: ParamTree, what: str,
              uses_step: bool) -> UserFn:
    """``prox(z, step, *params)`` (or ``projection(z, *params)``) -> flat ``(z, step, *leaves)``."""

    def flat(zf: torch.Tensor, step: Any, *leaves: Any) -> torch.Tensor:
        params = ptree.rebuild(leaves)
        z = layout.from_flat(zf)
        if not uses_step:
            out = fn(z, *params)
        else:
            if isinstance(step, torch.Tensor) and step.dim() > 0 and isinstance(z, torch.Tensor):
                step = step.reshape(*layout.batch_shape, *([1] * (z.dim() - layout.batch_ndim)))
            out = fn(z, step, *params)
        try:
            return layout.to_flat(out)
        except (RuntimeError, AttributeError) as err:
            raise ValueError(f"{what} must return the structure and shape of z") from err

    return UserFn(flat, n_lead=2)

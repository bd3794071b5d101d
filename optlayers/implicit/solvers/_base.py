"""Shared pieces of the generic iterative solvers (root, fixed point, minimize, least squares).

Every generic solver works on a batch of independent problems stored flat: iterates ``z`` of
shape ``(B, n)``, with per-element convergence (a converged element is frozen while the others
continue). Solvers are frozen dataclasses with a ``run_*`` method returning a flat
:class:`~optlayers.Result` (``solution`` of shape ``(B, n)``, flags of shape ``(B,)``).

Iterations are written with out-of-place tensor operations and masks (``torch.where``), so the
same code is differentiable when run under autograd (used by ``UnrollAdjoint``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Callback = Callable[[int, torch.Tensor], None]


def default_tol(dtype: torch.dtype, value: float | None, f64: float, f32: float) -> float:
    """Resolve a tolerance that defaults by dtype (``None`` -> ``f64`` or ``f32``)."""
    if value is not None:
        return value
    return f64 if dtype == torch.float64 else f32

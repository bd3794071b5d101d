"""The Sinkhorn kernels behind the dispatch: soft-min and transport-apply.

Two kernel names, each with a PyTorch reference (the eager, no-autograd path of
:mod:`optlayers.kernels.softmin_reference`), a Numba version (CPU) and a Triton version (CUDA):

* ``"ot.softmin"`` — ``fn(source, h, eps, *, block_elements=None) -> (B, n)``, the soft-min
  ``−ε log Σ_j exp((h_j − C_ij)/ε)``;
* ``"ot.kernel_apply"`` — ``fn(source, alpha, beta, eps, v, *, block_elements=None) -> (B, n, k)``,
  the transport-apply ``Σ_j exp(α_i + β_j − C_ij/ε) v_jk`` (``P·V``; ``Pᵀ·U`` on the transposed
  source).

The compiled backends take dense, squared-Euclidean and p-norm sources (:func:`kernel_supported`);
a user cost (:class:`~optlayers.kernels.softmin_reference.CallableSource`) can only be evaluated
by PyTorch, so callers send it to the reference directly. None of these define gradients.

Automatic choice on the CPU: the Numba soft-min is registered with a ``min_size`` (entries
``B·n·m``) from the measurements in ``benchmarks/bench_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._dispatch import Backend, dispatch, register
from .softmin_reference import (
    CallableSource,
    CostSource,
    kernel_apply_fast,
    softmin_fast,
)

__all__ = ["SOFTMIN", "KERNEL_APPLY", "kernel_supported", "softmin", "kernel_apply",
           "transport_displacement", "NUMBA_MIN_SIZE"]

SOFTMIN = "ot.softmin"
KERNEL_APPLY = "ot.kernel_apply"

#: Entries ``B·n·m`` from which automatic dispatch uses the Numba kernels on the CPU. Measured
#: (``benchmarks/bench_kernels.py``): the eager reference (one GEMM plus vectorized ``exp``)
#: beats Numba's scalar ``exp`` at every size on the development machine, so automatic dispatch
#: does not pick Numba for the soft-min; it stays available by forcing it.
NUMBA_MIN_SIZE = 1 << 62


def _numba_softmin() -> Callable[..., Any]:
    from .softmin_numba import softmin_numba
    return softmin_numba


def _numba_apply() -> Callable[..., Any]:
    from .softmin_numba import kernel_apply_numba
    return kernel_apply_numba


def _triton_softmin() -> Callable[..., Any]:
    from .softmin_triton import softmin_triton
    return softmin_triton


def _triton_apply() -> Callable[..., Any]:
    from .softmin_triton import kernel_apply_triton
    return kernel_apply_triton


register(SOFTMIN, Backend.REFERENCE, lambda: softmin_fast)
register(SOFTMIN, Backend.NUMBA, _numba_softmin, min_size=NUMBA_MIN_SIZE)
register(SOFTMIN, Backend.TRITON, _triton_softmin)
register(KERNEL_APPLY, Backend.REFERENCE, lambda: kernel_apply_fast)
register(KERNEL_APPLY, Backend.NUMBA, _numba_apply, min_size=NUMBA_MIN_SIZE)
register(KERNEL_APPLY, Backend.TRITON, _triton_apply)


def kernel_supported(source: CostSource) -> bool:
    """Whether the compiled backends can evaluate this cost source (not a user callable).

    Example:
        >>> import torch
        >>> from optlayers.kernels.softmin import kernel_supported
        >>> from optlayers.kernels.softmin_reference import CallableSource, SqEuclideanSource
        >>> x, y = torch.rand(1, 4, 2), torch.rand(1, 3, 2)
        >>> kernel_supported(SqEuclideanSource(x, y, 1.0)), kernel_supported(CallableSource(x, y, torch.cdist))
        (True, False)
    """
    return not isinstance(source, CallableSource)


def softmin(source: CostSource, h: torch.Tensor, eps: torch.Tensor, *, block_elements: int | None = None,
            backend: Backend | str | None = None) -> torch.Tensor:
    """Soft-min through the dispatch (no gradient); user costs always run the reference.

    .. math::
        \\operatorname{softmin}_\\varepsilon(h)_{bi} = -\\varepsilon_b \\log \\sum_j
            \\exp\\big((h_{bj} - C_{bij})/\\varepsilon_b\\big)

    for ``h (B, m)`` and ``ε (B,)``; returns ``(B, n)``. ``backend`` forces an implementation
    (see :func:`optlayers.kernels.dispatch`).

    Example:
        >>> import torch
        >>> from optlayers.kernels.softmin import softmin
        >>> from optlayers.kernels.softmin_reference import DenseSource
        >>> C = torch.rand(1, 4, 3, dtype=torch.float64)
        >>> h, eps = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
        >>> out = softmin(DenseSource(C), h, eps, backend="reference")
        >>> torch.allclose(out, -0.5 * torch.logsumexp(-C / 0.5, dim=-1))
        True
    """
    if not kernel_supported(source):
        return softmin_fast(source, h, eps, block_elements=block_elements)
    fn = dispatch(SOFTMIN, backend=backend, device=h.device, size=h.shape[0] * source.n * source.m)
    return fn(source, h, eps, block_elements=block_elements)


def kernel_apply(source: CostSource, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                 v: torch.Tensor, *, block_elements: int | None = None,
                 backend: Backend | str | None = None) -> torch.Tensor:
    """Transport-apply through the dispatch (no gradient); user costs always run the reference.

    .. math::
        (K v)_{bik} = \\sum_j \\exp\\big(\\alpha_{bi} + \\beta_{bj} - C_{bij}/\\varepsilon_b\\big)\\, v_{bjk}

    for ``α (B, n)``, ``β (B, m)``, ``ε (B,)`` and ``v (B, m, k)``; returns ``(B, n, k)``.

    Example:
        >>> import torch
        >>> from optlayers.kernels.softmin import kernel_apply
        >>> from optlayers.kernels.softmin_reference import DenseSource
        >>> C = torch.rand(1, 4, 3, dtype=torch.float64)
        >>> alpha, beta = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
        >>> eps, v = torch.tensor([0.5], dtype=torch.float64), torch.ones(1, 3, 1, dtype=torch.float64)
        >>> out = kernel_apply(DenseSource(C), alpha, beta, eps, v, backend="reference")
        >>> torch.allclose(out[..., 0], torch.exp(-C / 0.5).sum(-1))
        True
    """
    if not kernel_supported(source):
        return kernel_apply_fast(source, alpha, beta, eps, v, block_elements=block_elements)
    fn = dispatch(KERNEL_APPLY, backend=backend, device=alpha.device,
                  size=alpha.shape[0] * source.n * source.m)
    return fn(source, alpha, beta, eps, v, block_elements=block_elements)


@torch.no_grad()
def transport_displacement(x: torch.Tensor, y: torch.Tensor, source: CostSource, alpha: torch.Tensor,
                           beta: torch.Tensor, eps: torch.Tensor, *,
                           backend: Backend | str | None = None) -> torch.Tensor:
    """``Σ_j P_ij (x_i − y_j) = x_i (P1)_i − (P y)_i`` for ``x (B, n, d)``, ``y (B, m, d)``.

    One streaming transport-apply with ``v = [1, y]`` (``k = d + 1``); ``P_ij = exp(α_i + β_j −
    C_ij/ε)``. This is the gradient of ``⟨C, P⟩``-type terms with respect to the points for
    ``C = ½‖x − y‖²`` (times ``2·scale`` for other scales).

    Example:
        >>> import torch
        >>> from optlayers.kernels.softmin import transport_displacement
        >>> from optlayers.kernels.softmin_reference import SqEuclideanSource
        >>> x, y = torch.rand(1, 4, 2, dtype=torch.float64), torch.rand(1, 3, 2, dtype=torch.float64)
        >>> alpha, beta = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
        >>> eps = torch.tensor([0.5], dtype=torch.float64)
        >>> d = transport_displacement(x, y, SqEuclideanSource(x, y, 0.5), alpha, beta, eps, backend="reference")
        >>> P = torch.exp(-0.5 * torch.cdist(x, y) ** 2 / 0.5)
        >>> torch.allclose(d, (P[..., None] * (x[:, :, None] - y[:, None, :])).sum(2))
        True
    """
    ones = torch.ones_like(y[..., :1])
    out = kernel_apply(source, alpha, beta, eps, torch.cat([ones, y], -1), backend=backend)
    return x * out[..., :1] - out[..., 1:]

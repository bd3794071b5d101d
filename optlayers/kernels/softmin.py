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

Automatic choice on the CPU: the PyTorch reference, at every size and dtype. Measured with
``benchmarks/bench_kernels.py`` and an interleaved sweep (process CPU time, one thread for
PyTorch and Numba, squared Euclidean cost from points, ``d = 2``, ``B = 1`` unless noted; a
2-core machine shared with other jobs, load average 9–13, so entries vary between runs), ns per
cost entry ``B·n·m``, float32 / float64, ranges over two or three runs (2026-11-26)::

    kernel           n = m     reference             Numba               torch.compile
    soft-min            50     117 / 118             31 / 31             -
    soft-min           100     33 / 32               13 / 13             -
    soft-min           200     13.6-17 / 12-29       8.8-24 / 9.8-17     3.8-10.8 / 4.9-9.9
    soft-min          1000     3.5-5.4 / 5.9-7.6     7.1-9.4 / 7.3-11    2.2-2.4 / 3.8-5.0
    soft-min          4000     2.8-3.3 / 5.1-5.7     7.6-11 / 7.0-9.7    5.4-6.0 / 10.8-11.5
    soft-min      64 x 32²     24 / 18               20 / 11             -
    transport-apply     50     97 / 101              38 / 39             -
    transport-apply    100     31 / 32               18 / 20             -
    transport-apply    200     13-28 / 11-33         22-32 / 13-33       6.4-9.4 / 10.8
    transport-apply   1000     5.2-6.9 / 6.2-8.2     12-17 / 11-18       4.1-5.3 / 5.9-6.0
    transport-apply   4000     4.3-4.4 / 5.2-6.2     11-15 / 16-17       7.6-8.0 / 11.8-12.4
    transport-apply 64 x 32²   24 / 19               18 / 14             -

* Numba (scalar ``exp``, no SVML here) beats the reference per call only on small problems,
  where the reference's fixed per-call cost dominates: 2.4–3.8× (soft-min) and 1.6–2.6×
  (transport-apply) at ``50²``–``100²``, a tie at ``200²``, 1.2–1.6× on a batch of 64
  problems of ``32²``; from ``10⁵``–``10⁶`` entries on the reference's GEMM plus vectorized
  ``exp`` wins (Numba at 0.3–0.9× of its speed; the float64 soft-min ties up to ~2·10⁵). The
  per-call gain on small problems is at most ~0.2 ms, while Numba's one-off cost in a process is
  0.74 s CPU with its on-disk cache warm and 3–4 s per dtype when it compiles: ≥ ~4000 calls
  (10–20 small solves) before it pays, so a single small solve would be dominated by it.
  Automatic dispatch therefore never picks it; force it (``backend="numba"`` or
  ``OPTLAYERS_KERNELS=numba``) in a long loop over small problems.
* ``torch.compile`` of the fused expressions (Inductor) is the fastest per call from ``200²`` to
  ``1000²`` (1.1–3×) but slower than the reference at ``4000²`` (1.7–2.4× slower), and its first
  call costs 3–8 s CPU (Dynamo/Inductor start-up; 7–8 s in a fresh process) plus 0.13–1.4 s for
  every new shape (``dynamic=False``): it would need ~10⁹–10¹⁰ entries of work per process and
  shape to repay. It ships as the opt-in ``compiled`` backend
  (:mod:`optlayers.kernels.softmin_compiled`; ``backend="compiled"`` or
  ``OPTLAYERS_KERNELS=compiled``) for long loops over same-sized problems in the
  ``200²``–``1000²`` range, and automatic dispatch never picks it.

The Numba kernels stay registered (``min_size`` = :data:`NUMBA_MIN_SIZE`, never reached) so that
forcing them works and the forced-backend test passes run them.
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

#: Entries ``B·n·m`` from which automatic dispatch would use the Numba kernels on the CPU: never
#: (see the module docstring: the reference wins from ~4·10⁴ entries on, and below that Numba's
#: one-off load outweighs its per-call gain for any single solve). Forcing still runs them.
NUMBA_MIN_SIZE = 1 << 62


def _numba_softmin() -> Callable[..., Any]:
    from .softmin_numba import softmin_numba
    return softmin_numba


def _numba_apply() -> Callable[..., Any]:
    from .softmin_numba import kernel_apply_numba
    return kernel_apply_numba


def _compiled_softmin() -> Callable[..., Any]:
    from .softmin_compiled import softmin_compiled
    return softmin_compiled


def _compiled_apply() -> Callable[..., Any]:
    from .softmin_compiled import kernel_apply_compiled
    return kernel_apply_compiled


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
register(SOFTMIN, Backend.COMPILED, _compiled_softmin)  # opt-in: automatic dispatch never picks it
register(KERNEL_APPLY, Backend.COMPILED, _compiled_apply)


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

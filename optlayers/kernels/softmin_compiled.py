"""``torch.compile`` (Inductor) versions of the Sinkhorn kernels: the opt-in ``compiled`` backend.

The reference expressions, written once over whole tensors,

.. math::
    \\operatorname{softmin}_\\varepsilon(h)_{bi} = -\\varepsilon_b \\log \\sum_j
        \\exp\\big((h_{bj} - C_{bij})/\\varepsilon_b\\big), \\qquad
    (P V)_{bik} = \\sum_j \\exp(\\alpha_{bi} + \\beta_{bj} - C_{bij}/\\varepsilon_b)\\, v_{bjk},

with ``C`` computed from the points inside the expression (squared Euclidean or p-norm) or read
from a stored matrix, and handed to ``torch.compile``: for the soft-min Inductor fuses the cost,
the exponent and the reduction into one loop nest, so no ``n × m`` temporary is written (the
transport-apply writes its kernel matrix once and hands it to a GEMM). Per call this is the
fastest CPU path from about ``200²`` to ``1000²`` entries (see :mod:`optlayers.kernels.softmin`
for the measurements), but the first call in a process costs seconds (Dynamo and Inductor
start-up, a C++ compiler run) and each new shape or dtype compiles again; it therefore runs only
when forced (``backend="compiled"`` or ``OPTLAYERS_KERNELS=compiled``), e.g. in a long training
loop over same-sized problems. No gradients are defined here (the callers run without autograd).

Example:
    >>> import torch
    >>> from optlayers.kernels.softmin_compiled import cost_kind
    >>> from optlayers.kernels.softmin_reference import SqEuclideanSource
    >>> cost_kind(SqEuclideanSource(torch.zeros(1, 3, 2), torch.zeros(1, 4, 2)))
    'sqeuclid'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._dispatch import KernelUnavailableError
from .softmin_reference import CostSource, DenseSource, PNormSource, SqEuclideanSource

__all__ = ["softmin_compiled", "kernel_apply_compiled", "cost_kind"]


def cost_kind(source: CostSource) -> str:
    """The compiled cost expression for a source: ``"dense"``, ``"sqeuclid"`` or ``"pnorm"``.

    Raises:
        ValueError: a user cost (only the reference evaluates those).
    """
    if isinstance(source, DenseSource):
        return "dense"
    if isinstance(source, SqEuclideanSource):
        return "sqeuclid"
    if isinstance(source, PNormSource):
        return "pnorm"
    raise ValueError(f"the compiled kernels take dense, squared-Euclidean or p-norm costs, not "
                     f"{type(source).__name__}")


def _cost(kind: str, a: torch.Tensor, b: torch.Tensor, scale: float, p: float) -> torch.Tensor:
    """``C (B, n, m)`` as an expression Inductor fuses into its consumer."""
    if kind == "dense":
        return a
    d2 = ((a[:, :, None, :] - b[:, None, :, :]) ** 2).sum(-1)
    if kind == "sqeuclid":
        return scale * d2
    pos = d2 > 0  # d2^(p/2) with 0 at coincident points, as the reference's _safe_pow
    return scale * torch.where(pos, torch.where(pos, d2, torch.ones_like(d2)).pow(0.5 * p), torch.zeros_like(d2))


def _softmin_expr(kind: str, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, eps: torch.Tensor,
                  scale: float, p: float) -> torch.Tensor:
    c = _cost(kind, a, b, scale, p)
    return -eps[:, None] * torch.logsumexp((h[:, None, :] - c) / eps[:, None, None], dim=-1)


def _apply_expr(kind: str, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                eps: torch.Tensor, v: torch.Tensor, scale: float, p: float) -> torch.Tensor:
    c = _cost(kind, a, b, scale, p)
    return torch.exp(alpha[:, :, None] + beta[:, None, :] - c / eps[:, None, None]) @ v


@functools.cache
def _compiled(which: str) -> Callable[..., Any]:
    fn = _softmin_expr if which == "softmin" else _apply_expr
    return torch.compile(fn, fullgraph=True)


def _operands(source: CostSource) -> tuple[str, torch.Tensor, torch.Tensor, float, float]:
    kind = cost_kind(source)
    if isinstance(source, DenseSource):
        return kind, source.cost, source.cost, 1.0, 2.0
    assert isinstance(source, (SqEuclideanSource, PNormSource))
    p = source.p if isinstance(source, PNormSource) else 2.0
    return kind, source.x, source.y, float(source.scale), float(p)


def _run(which: str, *args: Any) -> torch.Tensor:
    try:
        return _compiled(which)(*args)
    except Exception as exc:  # noqa: BLE001 - Dynamo, Inductor or C++ compiler failures of any kind
        raise KernelUnavailableError(
            f"the compiled backend failed ({type(exc).__name__}: {str(exc)[:300]}); torch.compile "
            "needs a working C++ compiler for CPU tensors; use the reference backend instead") from exc


@torch.no_grad()
def softmin_compiled(source: CostSource, h: torch.Tensor, eps: torch.Tensor, *,
                     block_elements: int | None = None) -> torch.Tensor:
    """``−ε log Σ_j exp((h_j − C_ij)/ε)``, ``(B, n)``, one fused Inductor kernel.

    Same signature and result as :func:`~optlayers.kernels.softmin_reference.softmin_reference`
    (``block_elements`` is ignored: nothing ``n × m`` is stored).
    """
    del block_elements
    kind, a, b, scale, p = _operands(source)
    return _run("softmin", kind, a, b, h, eps.reshape(h.shape[0]), scale, p)


@torch.no_grad()
def kernel_apply_compiled(source: CostSource, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                          v: torch.Tensor, *, block_elements: int | None = None) -> torch.Tensor:
    """``Σ_j exp(α_i + β_j − C_ij/ε) v_jk``, ``(B, n, k)``, one fused Inductor kernel."""
    del block_elements
    kind, a, b, scale, p = _operands(source)
    return _run("apply", kind, a, b, alpha, beta, eps.reshape(alpha.shape[0]), v, scale, p)

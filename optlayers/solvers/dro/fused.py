r"""Training fast path of the DRO losses: the robust value and its Danskin gradient from one
compiled (Numba) call per row, with no per-op tensor overhead.

:func:`fused_robust_value` computes, for CPU losses and the specs below, the same quantity as
``robust_weights(losses, spec).aux.value``,

.. math:: R(\ell) = \langle p^\star, \ell\rangle - \lambda D(p^\star), \qquad
          \partial R/\partial\ell = p^\star \quad\text{(Danskin)},

by the same algorithms (the fused row solvers of :mod:`optlayers.kernels.dro_kernels` transcribe
the PyTorch solvers step by step; the tests compare the two to the solvers' tolerance): the
detached losses are read as one float64 NumPy array, the whole inner problem (selection, sort,
scan, PAV or 1-D safeguarded Newton–bisection, then the weights) runs in compiled code, and a
small autograd function returns :math:`R` with backward ``grad * p``. At a training step's
sizes the PyTorch solvers spend most of their time in the per-op overhead of tens of small
tensor ops; here a step costs a few NumPy/Numba calls.

Covered: ``CVaR`` (unsmoothed), ``TotalVariation``, ``ChiSquareBall`` (no penalty),
``ChiSquarePenalty``, ``KLBall``, ``KLPenalty``, ``CressieRead`` (``k != 2``), ``Spectral``
(with a penalty) and ``HolisticRobust``. Anything else — other devices, a forced non-Numba
backend, non-finite losses, a root-find that did not converge — returns ``None`` and the caller
uses :func:`~optlayers.solvers.dro.robust_weights`, which handles and reports those cases.

Warm start: the root-find specs (KL ball, Cressie–Read, holistic) return their root (in the
solver's own variable); passing it back as ``warm`` on the next call starts the search there.
The stopping test does not change (``|f| <= tol`` on the feasible side), so the result agrees
with a cold start to the tolerance; successive training batches have close roots, so a warm
search typically needs 1–3 function evaluations instead of 5–10.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...kernels import ENV_VAR, Backend, backend_available, forced_backend
from ._specs import (
    ChiSquareBall,
    ChiSquarePenalty,
    CressieRead,
    CVaR,
    DROSpec,
    HolisticRobust,
    KLBall,
    KLPenalty,
    Spectral,
    TotalVariation,
)
from .cvar import cvar_k

__all__ = ["fused_supported", "fused_solve", "fused_robust_value", "DanskinValue"]

#: largest batch (number of rows) the fast path takes; bigger batches amortise the per-op
#: overhead of the batched PyTorch solvers
MAX_ROWS = 64


class DanskinValue(torch.autograd.Function):
    """``value`` as a function of ``losses`` with gradient ``grad[..., None] * p`` (``p`` fixed)."""

    @staticmethod
    def forward(ctx: Any, losses: Tensor, value: Tensor, p: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(p)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * p, None, None


def fused_supported(spec: DROSpec) -> bool:
    """Whether :func:`fused_solve` covers ``spec``."""
    if isinstance(spec, CVaR):
        return spec.smoothing == 0
    if isinstance(spec, ChiSquareBall):
        return spec.lam == 0
    if isinstance(spec, CressieRead):
        return spec.k != 2.0
    if isinstance(spec, Spectral):
        return spec.lam > 0
    return isinstance(spec, (TotalVariation, ChiSquarePenalty, KLBall, KLPenalty, HolisticRobust))


def _argmax_uniform(a: np.ndarray) -> np.ndarray:
    top = (a == a.max(1, keepdims=True)).astype(np.float64)
    return top / top.sum(1, keepdims=True)


def _value(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", p, a)


def fused_solve(a: np.ndarray, spec: DROSpec, *, tol: float, max_iter: int,
                warm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weights, robust value, root (NaN for closed forms) and convergence flags of every row of
    the finite, C-contiguous float64 ``(B, n)`` array ``a`` (Numba; see the module doc)."""
    from ...kernels import dro_kernels as K

    B, n = a.shape
    if isinstance(spec, TotalVariation) and (spec.eps >= 1.0 or spec.eps <= 0.0):
        p = _argmax_uniform(a) if spec.eps >= 1.0 else np.full_like(a, 1.0 / n)
        return p, _value(p, a), np.full(B, np.nan), np.ones(B, dtype=np.bool_)
    if isinstance(spec, (CVaR, TotalVariation)):
        eps = spec.eps if isinstance(spec, TotalVariation) else 0.0
        alpha = spec.alpha if isinstance(spec, CVaR) else 1.0 - eps
        return K.fused_rows("cvar", a, (float(alpha), cvar_k(alpha, n), float(eps)), tol, max_iter, None)
    if isinstance(spec, ChiSquareBall):
        if spec.rho <= 0.0:
            p = np.full_like(a, 1.0 / n)
            return p, _value(p, a), np.full(B, np.nan), np.ones(B, dtype=np.bool_)
        return K.fused_rows("chi2_ball", a, (float(spec.rho),), tol, max_iter, None)
    if isinstance(spec, Spectral):
        w = spec.sigma.cached_weights(n, torch.float64, torch.device("cpu")).flip(0).numpy()
        return K.fused_rows("spectral", a, (w, float(spec.lam), spec.divergence == "kl"), tol, max_iter, None)
    if isinstance(spec, ChiSquarePenalty):
        return K.fused_rows("chi2_penalty", a, (float(spec.lam),), tol, max_iter, None)
    if isinstance(spec, KLPenalty):
        return K.fused_rows("kl_penalty", a, (float(spec.lam), -1.0 if spec.optimistic else 1.0), tol, max_iter, None)
    if isinstance(spec, KLBall):
        return K.fused_rows("kl_ball", a, (float(spec.rho),), tol, max_iter, warm)
    if isinstance(spec, CressieRead):
        if spec.rho is not None:
            return K.fused_rows("cr_ball", a, (float(spec.k), float(spec.rho)), tol, max_iter, warm)
        return K.fused_rows("cr_penalty", a, (float(spec.k), float(spec.lam)), tol, max_iter,  # type: ignore[arg-type]
                            warm)
    if isinstance(spec, HolisticRobust):
        return K.fused_rows("holistic", a, (float(spec.alpha), float(spec.r)), tol, max_iter, warm)
    raise TypeError(f"fused_solve does not cover {type(spec).__name__}")


def fused_available(losses: Tensor, backend: Backend | str | None) -> bool:
    """Whether the fast path may run: CPU losses, Numba installed, and no backend other than
    Numba requested (by ``backend=`` or ``OPTLAYERS_KERNELS``)."""
    global _NUMBA_OK
    if losses.device.type != "cpu" or losses.dim() == 0 or losses.shape[-1] == 0:
        return False
    if backend is None and _NUMBA_OK and not os.environ.get(ENV_VAR):  # the common case, cheaply
        return True
    if backend is not None:
        if Backend.parse(backend) is not Backend.NUMBA:
            return False
    else:
        forced = forced_backend()
        if forced is not None and forced is not Backend.NUMBA:
            return False
    if not _NUMBA_OK:
        _NUMBA_OK = backend_available(Backend.NUMBA)
    return _NUMBA_OK


_NUMBA_OK: bool | None = None


def fused_robust_value(losses: Tensor, spec: DROSpec, *, tol: float | None = None, max_iter: int = 100,
                       backend: Backend | str | None = None,
                       state: dict[str, Any] | None = None) -> tuple[Tensor, Tensor] | None:
    """``(value, p)``: the robust value (differentiable, Danskin) and the weights (no gradient) of
    ``losses`` (``(*batch, n)``), or ``None`` when the fast path does not apply (see the module
    doc; the caller then uses :func:`~optlayers.solvers.dro.robust_weights`).

    ``state``: a dict kept by the caller between calls for the warm start (the root of the
    previous call, per batch shape); ``None`` disables it.
    """
    if not fused_supported(spec) or not fused_available(losses, backend):
        return None
    n = losses.shape[-1]
    batch = losses.shape[:-1]
    B = math.prod(batch)
    if B > MAX_ROWS or B == 0:
        return None
    if tol is None:
        tol_ = 1e-12 if losses.dtype == torch.float64 else 1e-7
    elif not (tol > 0 and math.isfinite(tol)):
        return None  # robust_weights raises the error
    else:
        tol_ = float(tol)
    a = np.ascontiguousarray(losses.detach().reshape(B, n).to(torch.float64).numpy())
    s = float(a.sum())
    if not math.isfinite(s) and not np.isfinite(a).all():
        return None
    key = (tuple(batch), n)
    warm = None
    if state is not None and state.get("key") == key:
        warm = state.get("x")
    p, val, x, conv = fused_solve(a, spec, tol=tol_, max_iter=int(max_iter), warm=warm)
    if not conv.all():
        if state is not None:
            state.clear()
        return None
    if state is not None:
        state["key"] = key
        state["x"] = x
    dt = losses.dtype
    p_t = torch.from_numpy(p).to(dt).reshape(losses.shape)
    v_t = torch.from_numpy(val).to(dt).reshape(batch)
    return DanskinValue.apply(losses, v_t, p_t), p_t

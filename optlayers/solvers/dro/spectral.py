r"""Spectral risk measures with an optional :math:`\chi^2` or KL penalty: sort + PAV, exact.

.. math:: \max_{q\in\mathcal P(\sigma)} \langle q,\ell\rangle - \lambda D(q)

over the permutahedron of the spectrum :math:`\sigma` (Mehta et al., "Distributionally Robust
Optimization with Bias and Variance Reduction", ICLR 2024; Blondel et al., "Fast Differentiable
Sorting and Ranking", ICML 2020):

* :math:`\lambda = 0`: :math:`q` assigns :math:`\sigma_i` to the :math:`i`-th smallest loss
  (losses tied share their :math:`\sigma`'s equally);
* :math:`\chi^2` (:math:`D = n\lVert q-u\rVert^2`): with :math:`z = \ell/(2\lambda n)` sorted
  descending and :math:`w` = :math:`\sigma` sorted descending,
  :math:`q_{\text{sorted}} = z - v`, where :math:`v` is the non-increasing isotonic regression of
  :math:`z - w` (pool adjacent violators, block value = mean);
* KL: with :math:`z = \ell/\lambda`, :math:`q_{\text{sorted}} = e^{z - v}` where the PAV block
  value is :math:`\log\sum_B e^{z_i} - \log\sum_B w_i`.

The kernels ``"dro.perm_proj_l2"`` and ``"dro.perm_proj_kl"`` (``fn(z, w) -> q`` on ``(B, n)``
float64 rows, ``w`` the spectrum in descending order) have the references below (``torch.sort``
and a sequential Python PAV; CUDA rows are copied to the CPU for the O(n) pass) and Numba
versions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...kernels import Backend, dispatch, register
from ._common import Solved, chi2_to_uniform, exact, kl_to_uniform, tie_average
from ._specs import Spectral

__all__ = ["perm_proj_l2_reference", "perm_proj_kl_reference", "solve_spectral"]


def _pav_l2_row(y: list[float]) -> list[float]:
    n = len(y)
    sums = [0.0] * n
    cnt = [0] * n
    top = -1
    for i in range(n):
        top += 1
        sums[top] = y[i]
        cnt[top] = 1
        while top > 0 and sums[top - 1] * cnt[top] <= sums[top] * cnt[top - 1]:
            sums[top - 1] += sums[top]
            cnt[top - 1] += cnt[top]
            top -= 1
    out: list[float] = []
    for b in range(top + 1):
        out.extend([sums[b] / cnt[b]] * cnt[b])
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def _pav_kl_row(z: list[float], w: list[float]) -> list[float]:
    n = len(z)
    lse = [0.0] * n
    ws = [0.0] * n
    val = [0.0] * n
    cnt = [0] * n
    top = -1
    for i in range(n):
        top += 1
        lse[top] = z[i]
        ws[top] = w[i]
        val[top] = z[i] - math.log(w[i]) if w[i] > 0 else math.inf
        cnt[top] = 1
        while top > 0 and val[top - 1] <= val[top]:
            lse[top - 1] = _logaddexp(lse[top - 1], lse[top])
            ws[top - 1] += ws[top]
            cnt[top - 1] += cnt[top]
            val[top - 1] = lse[top - 1] - math.log(ws[top - 1]) if ws[top - 1] > 0 else math.inf
            top -= 1
    out: list[float] = []
    for b in range(top + 1):
        out.extend([val[b]] * cnt[b])
    return out


def _pav_l2_rows(y: Tensor) -> Tensor:
    return torch.tensor([_pav_l2_row(r) for r in y.tolist()], dtype=y.dtype)


def _pav_kl_rows(z: Tensor, w: Tensor) -> Tensor:
    wl = w.tolist()
    return torch.tensor([_pav_kl_row(r, wl) for r in z.tolist()], dtype=z.dtype)


def perm_proj_l2_reference(z: Tensor, w: Tensor) -> Tensor:
    """Euclidean projection of each row of ``z`` (``(B, n)``) onto the permutahedron of ``w``
    (``(n,)``, descending): sort, non-increasing isotonic regression of ``z_sorted - w``
    (sequential PAV on the CPU), subtract, unsort."""
    s, idx = torch.sort(z, dim=1, descending=True, stable=True)
    v = _pav_l2_rows((s - w).cpu()).to(z.device)
    qs = (s - v).clamp(min=0.0)
    qs = qs / qs.sum(1, keepdim=True)
    return torch.empty_like(z).scatter_(1, idx, qs)


def perm_proj_kl_reference(z: Tensor, w: Tensor) -> Tensor:
    """KL projection (:math:`\\arg\\max_{q\\in\\mathcal P(w)}\\langle q, z\\rangle - \\sum q\\log q`) of
    each row: sort, log-sum-exp-pooling PAV, ``exp(z_sorted - v)``, unsort."""
    s, idx = torch.sort(z, dim=1, descending=True, stable=True)
    v = _pav_kl_rows(s.cpu(), w.cpu()).to(z.device)
    qs = torch.exp(s - v)
    qs = qs / qs.sum(1, keepdim=True)
    return torch.empty_like(z).scatter_(1, idx, qs)


def _load_l2() -> Callable[..., Any]:
    from ...kernels.dro_kernels import perm_proj_l2_numba

    return perm_proj_l2_numba


def _load_kl() -> Callable[..., Any]:
    from ...kernels.dro_kernels import perm_proj_kl_numba

    return perm_proj_kl_numba


register("dro.perm_proj_l2", Backend.REFERENCE, lambda: perm_proj_l2_reference)
register("dro.perm_proj_l2", Backend.NUMBA, _load_l2, min_size=256)
register("dro.perm_proj_kl", Backend.REFERENCE, lambda: perm_proj_kl_reference)
register("dro.perm_proj_kl", Backend.NUMBA, _load_kl, min_size=256)


def solve_spectral(L: Tensor, spec: Spectral, *, backend: Backend | str | None = None) -> Solved:
    """Exact spectral-risk weights; duals ``eta`` = NaN, ``lam`` = the penalty :math:`\\lambda`."""
    B, n = L.shape
    sigma = spec.sigma.cached_weights(n, L.dtype, L.device)
    lam = spec.lam
    if lam == 0.0:
        s, idx = torch.sort(L, dim=1, stable=True)
        qs = tie_average(s, sigma.expand(B, n).contiguous())
        q = torch.empty_like(L).scatter_(1, idx, qs)
        return exact(q, divergence=chi2_to_uniform(q))
    w = sigma.flip(0).contiguous()
    # PAV is sequential: the numba kernel runs on the CPU (CUDA rows are copied over and back)
    if spec.divergence == "chi2":
        fn = dispatch("dro.perm_proj_l2", backend=backend, device="cpu", size=n)
        q = fn(L / (2.0 * lam * n), w).to(L.device)
        div = chi2_to_uniform(q)
    else:
        fn = dispatch("dro.perm_proj_kl", backend=backend, device="cpu", size=n)
        q = fn(L / lam, w).to(L.device)
        div = kl_to_uniform(q)
    return exact(q, penalty=lam * div, lam=torch.full((B,), lam, dtype=L.dtype, device=L.device), divergence=div)

r""":math:`\chi^2` ball, :math:`\chi^2` penalty and ball + penalty, all exact.

With :math:`D(p) = \frac1n\sum_i(np_i-1)^2 = n\lVert p-u\rVert^2` every case has a maximiser of
the form :math:`p_i = c\,(\ell_i-\eta)_+` with :math:`c = 1/(2\mu n)`, :math:`\mu` the total
multiplier of :math:`D`:

* penalty :math:`\lambda`: :math:`\mu = \lambda`, i.e. the Euclidean simplex projection
  :math:`p = \Pi_\Delta(u + \ell/(2\lambda n))` (sort + cumsum);
* ball :math:`\rho`: sort descending; for a support of the :math:`k` largest losses with mean
  :math:`m_k` and variance :math:`v_k`, :math:`p = 1/k + c(\ell - m_k)` on the support and the
  constraint :math:`D = \rho` gives
  :math:`c^2 = ((1+\rho)/n - 1/k)/(k v_k)`, :math:`\eta = m_k - 1/(kc)`. The support is the
  :math:`k` for which :math:`\ell_{(k+1)} \le \eta < \ell_{(k)}` (a scan over all :math:`k`,
  :math:`O(n\log n)` with the sort). If :math:`\rho \ge n/m - 1` (``m`` losses tied at the
  max) the ball does not bind and :math:`p` is uniform over the maximal losses;
* ball + penalty: :math:`\mu = \max(\lambda, \mu_{\text{ball}})`.

Dual: :math:`\min_{\eta,\nu\ge0} \eta + \mu + \nu\rho + \frac{1}{4\mu n}\sum_i(\ell_i-\eta)_+^2`
with :math:`\mu = \lambda+\nu`. The kernel ``"dro.chi2_ball"``
(``fn(L, rho) -> (p, eta, c)`` on a ``(B, n)`` float64 batch; ``c = inf`` when the ball does
not bind, ``c = 0`` for ``rho = 0``) has this PyTorch reference and a Numba version.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...kernels import Backend, dispatch, register
from ._common import Solved, argmax_uniform, chi2_to_uniform, exact, simplex_threshold

__all__ = ["chi2_ball_reference", "solve_chi2_ball", "solve_chi2_penalty"]


def chi2_ball_reference(L: Tensor, rho: float) -> tuple[Tensor, Tensor, Tensor]:
    """Exact :math:`\\chi^2`-ball weights (PyTorch reference): ``(p, eta, c)``, ``p = c (L - eta)_+``."""
    B, n = L.shape
    dtype, dev = L.dtype, L.device
    lmax = L.amax(1)
    n_top = (L == lmax[:, None]).sum(1)
    inactive = rho >= n / n_top.to(dtype) - 1.0  # includes n == 1 and all-equal rows
    if rho <= 0.0:
        p = torch.full_like(L, 1.0 / n)
        return p, torch.full_like(lmax, -math.inf), torch.zeros_like(lmax)
    s, _ = torch.sort(L, dim=1, descending=True)
    d = s - s[:, :1]  # <= 0, shift by the max for accuracy
    k = torch.arange(1, n + 1, dtype=dtype, device=dev)
    m = torch.cumsum(d, 1) / k
    var = (torch.cumsum(d * d, 1) / k - m * m).clamp(min=0.0)
    need = (1.0 + rho) / n - 1.0 / k
    with torch.no_grad():
        c = torch.sqrt(need.clamp(min=0.0) / (k * var))
        eta = m - 1.0 / (k * c)
        nxt = torch.cat([d[:, 1:], torch.full_like(d[:, :1], -math.inf)], 1)
        viol = (nxt - eta).clamp(min=0.0) + (eta - d).clamp(min=0.0)
        ok = (need >= -1e-15) & (var > 0) & torch.isfinite(eta) & torch.isfinite(c)
        viol = torch.where(ok, viol, torch.full_like(viol, math.inf))
        kstar = torch.argmin(viol, dim=1)
    cb = c.gather(1, kstar[:, None]).squeeze(1)
    eb = eta.gather(1, kstar[:, None]).squeeze(1) + s[:, 0]
    p = (cb[:, None] * (L - eb[:, None])).clamp(min=0.0)
    p = p / p.sum(1, keepdim=True)
    p = torch.where(inactive[:, None], argmax_uniform(L), p)
    eb = torch.where(inactive, lmax, eb)
    cb = torch.where(inactive, torch.full_like(cb, math.inf), cb)
    return p, eb, cb


def _load_numba() -> Callable[..., Any]:
    from ...kernels.dro_kernels import chi2_ball_numba

    return chi2_ball_numba


register("dro.chi2_ball", Backend.REFERENCE, lambda: chi2_ball_reference)
register("dro.chi2_ball", Backend.NUMBA, _load_numba, min_size=256)


def _penalty_weights(L: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    n = L.shape[1]
    c = torch.full((L.shape[0],), 1.0 / (2.0 * lam * n), dtype=L.dtype, device=L.device)
    s, _ = torch.sort(L, dim=1, descending=True)
    eta = simplex_threshold(s, c)
    p = (c[:, None] * (L - eta[:, None])).clamp(min=0.0)
    return p / p.sum(1, keepdim=True), eta, c


def solve_chi2_penalty(L: Tensor, lam: float) -> Solved:
    r"""Exact :math:`\chi^2` penalty: :math:`p = \Pi_\Delta(u + \ell/(2\lambda n))`.

    Duals: ``eta`` the threshold (:math:`p = (\ell-\eta)_+/(2\lambda n)`), ``lam`` = :math:`\lambda`.
    """
    p, eta, _ = _penalty_weights(L, lam)
    div = chi2_to_uniform(p)
    return exact(p, penalty=lam * div, eta=eta, lam=torch.full_like(eta, lam), divergence=div)


def solve_chi2_ball(L: Tensor, rho: float, lam: float = 0.0, *,
                    backend: Backend | str | None = None) -> Solved:
    r"""Exact :math:`\chi^2` ball (optionally with penalty ``lam``).

    Duals: ``eta`` the threshold and ``lam`` the total multiplier :math:`\mu = \lambda + \nu`
    of :math:`D` (``inf`` for ``rho = 0``, 0 when neither the ball nor a penalty binds).
    """
    n = L.shape[1]
    fn = dispatch("dro.chi2_ball", backend=backend, device=L.device, size=n)
    p, eta, c = fn(L, rho)
    if lam > 0.0:
        c_pen = 1.0 / (2.0 * lam * n)
        use_pen = c > c_pen
        if bool(use_pen.any()):
            pp, ep, _ = _penalty_weights(L, lam)
            p = torch.where(use_pen[:, None], pp, p)
            eta = torch.where(use_pen, ep, eta)
            c = torch.where(use_pen, torch.full_like(c, c_pen), c)
    with torch.no_grad():
        mu = torch.where(c == 0, torch.full_like(c, math.inf), 1.0 / (2.0 * n * c))
    div = chi2_to_uniform(p)
    return exact(p, penalty=lam * div, eta=eta, lam=mu, divergence=div)

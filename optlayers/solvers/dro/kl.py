r"""KL penalty (closed form, logsumexp), its sign-flipped (optimistic) variant, and the KL ball.

Penalty :math:`\lambda`:

.. math:: \max_p \langle p,\ell\rangle - \lambda\,\mathrm{KL}(p\|u)
          = \lambda\log\tfrac1n\textstyle\sum_i e^{\ell_i/\lambda},\qquad
          p = \mathrm{softmax}(\ell/\lambda).

Ball :math:`\rho`: :math:`\min_{\lambda>0} \lambda\rho + \lambda\log\frac1n\sum_i e^{\ell_i/\lambda}`.
:math:`\lambda^\star` solves :math:`\mathrm{KL}(\mathrm{softmax}(\ell/\lambda)\|u) = \rho`; the
left side decreases in :math:`\lambda` with
:math:`\mathrm d\,\mathrm{KL}/\mathrm d\log\lambda = -\mathrm{Var}_p(\ell/\lambda)`, so a
safeguarded Newton–bisection on :math:`\log\rho - \log\mathrm{KL}` in :math:`x = \log\lambda`
converges fast. The bracket :math:`\lambda \le (\max\ell - \min\ell)/\rho` (where
:math:`\mathrm{KL}\le\rho`) is exact; the lower end is found by doubling steps in :math:`x`.
The returned weights are at the feasible end of the final bracket (:math:`\mathrm{KL}\le\rho`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...kernels import Backend, dispatch, register
from ._common import Solved, argmax_uniform, exact, kl_to_uniform, newton_bisect, row_dot

__all__ = ["solve_kl_penalty", "solve_kl_ball", "kl_ball_root_reference"]


def solve_kl_penalty(L: Tensor, lam: float, *, optimistic: bool = False) -> Solved:
    r"""Closed form; duals ``eta`` with :math:`p = e^{\pm(\ell-\eta)/\lambda}/n`, ``lam`` = :math:`\lambda`."""
    n = L.shape[1]
    sign = -1.0 if optimistic else 1.0
    z = sign * L / lam
    lse = torch.logsumexp(z, dim=1)
    p = torch.softmax(z, dim=1)
    kl = kl_to_uniform(p)
    eta = sign * lam * (lse - math.log(n))
    return exact(p, penalty=sign * lam * kl, eta=eta, lam=torch.full_like(eta, lam), divergence=kl)


def _tilt(Z: Tensor, Zbar: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # s = Z / lambda - shift, w = e^s = 1 + em, p = w / sum(w).  For small 1/lambda the shift
    # is the mean of Z / lambda, so em is small and KL = E_p[s] - log1p(mean(em)) keeps its
    # relative accuracy for tiny radii; otherwise shift = 0 (s <= 0, no overflow).
    n = Z.shape[1]
    c = torch.exp(-x)
    shift = torch.where(c * Zbar.abs() <= 30.0, c * Zbar, torch.zeros_like(c))
    s = torch.addcmul(-shift[:, None], Z, c[:, None])
    em = torch.expm1(s)
    A = em.mean(1)
    ems = em * s
    S0 = n * (1.0 + A)
    m1 = (s.sum(1) + ems.sum(1)) / S0
    kl = (m1 - torch.log1p(A)).clamp(min=0.0)
    return em, S0, kl, ems, s, m1, shift


def kl_ball_root_reference(Z: Tensor, logrho: float, x0: Tensor, hi: Tensor, active: Tensor, *, tol: float,
                           max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The multiplier search of the KL ball (PyTorch reference of the kernel ``"dro.kl_ball_root"``).

    ``Z`` (``(B, n)``, max 0, range 1 on active rows): root of
    :math:`\log\rho - \log\mathrm{KL}(\mathrm{softmax}(Z e^{-x})\|u)` in :math:`x = \log\lambda`,
    from ``x0`` with the known upper end ``hi``, feasible side ``hi``. Returns
    ``(lo, hi, residual, converged, iterations)`` of :func:`._common.newton_bisect`.
    """
    Zbar = Z.mean(1)

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        _, S0, kl, ems, s, m1, _ = _tilt(Z, Zbar, x)
        var = ((row_dot(s, s) + row_dot(ems, s)) / S0 - m1 * m1).clamp(min=0.0)
        return logrho - torch.log(kl), var / kl

    lo = torch.full_like(hi, -math.inf)
    _, lo, hi, res, conv, iters = newton_bisect(fn, lo, hi, x0, tol=tol, max_iter=max_iter, feasible="hi",
                                                active=active, xmin=-700.0)
    return lo, hi, res, conv, iters


def _load_numba() -> Callable[..., Any]:
    from ...kernels.dro_kernels import kl_ball_root_numba

    return kl_ball_root_numba


register("dro.kl_ball_root", Backend.REFERENCE, lambda: kl_ball_root_reference)
register("dro.kl_ball_root", Backend.NUMBA, _load_numba)


def solve_kl_ball(L: Tensor, rho: float, *, tol: float, max_iter: int,
                  backend: Backend | str | None = None) -> Solved:
    r"""KL ball by safeguarded Newton–bisection in :math:`\log\lambda` (relative tolerance ``tol``
    on :math:`\mathrm{KL}/\rho`). Duals: ``lam`` = :math:`\lambda^\star`, ``eta`` with
    :math:`p = e^{(\ell-\eta)/\lambda}/n` (so :math:`\eta = \lambda\log\frac1n\sum e^{\ell/\lambda}`).
    The search is the kernel ``"dro.kl_ball_root"`` (PyTorch reference, Numba on the CPU)."""
    B, n = L.shape
    lmax, lmin = L.amax(1), L.amin(1)
    R = lmax - lmin
    n_top = (L == lmax[:, None]).sum(1).to(L.dtype)
    inactive = rho >= torch.log(n / n_top)  # includes all-equal rows
    if rho <= 0.0:
        p = torch.full_like(L, 1.0 / n)
        return exact(p, eta=L.mean(1), lam=torch.full_like(lmax, math.inf), divergence=torch.zeros_like(lmax))
    active = ~inactive
    Rs = torch.where(active, R, torch.ones_like(R))
    Z = (L - lmax[:, None]) / Rs[:, None]  # in [-1, 0], range 1 on active rows
    logrho = math.log(rho)

    # lambda = range / rho gives KL <= rho (exact upper end); the lower end is found by the
    # root-finder's expansion. Start from the small-radius asymptote KL ~ Var(Z) / (2 lambda^2).
    hi = torch.full_like(R, -logrho)
    var_u = Z.var(1, unbiased=False)
    x0 = 0.5 * torch.log(var_u / (2.0 * rho))
    x0 = torch.where(torch.isfinite(x0), x0.clamp(max=-logrho), hi - 1.0)
    root = dispatch("dro.kl_ball_root", backend=backend, device=L.device, size=n)
    lo, hi, res, conv, iters = root(Z, logrho, x0, hi, active, tol=tol, max_iter=max_iter)
    hi, res, conv, iters = hi.to(L.device), res.to(L.device), conv.to(L.device), iters.to(L.device)
    em, S0, kl, _, _, _, shift = _tilt(Z, Z.mean(1), hi)  # feasible side: KL <= rho
    p = (em + 1.0) / S0[:, None]
    lam = torch.exp(hi) * Rs
    # eta = lambda log mean e^{l / lambda},  l / lambda = lmax / lambda + s + shift
    eta = lmax + lam * (torch.log(S0 / n) + shift)
    if bool(inactive.any()):
        p = torch.where(inactive[:, None], argmax_uniform(L), p)
        kl = torch.where(inactive, torch.log(n / n_top), kl)
    lam = torch.where(inactive, torch.zeros_like(lam), lam)
    eta = torch.where(inactive, lmax, eta)
    conv = conv | inactive
    res = torch.where(inactive, torch.zeros_like(res), res)
    return Solved(p=p, penalty=torch.zeros_like(lam), eta=eta, lam=lam, divergence=kl,
                  converged=conv, iterations=iters, residual=res)

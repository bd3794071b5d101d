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

import torch
from torch import Tensor

from ._common import Solved, argmax_uniform, exact, kl_to_uniform, newton_bisect

__all__ = ["solve_kl_penalty", "solve_kl_ball"]


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


def solve_kl_ball(L: Tensor, rho: float, *, tol: float, max_iter: int) -> Solved:
    r"""KL ball by safeguarded Newton–bisection in :math:`\log\lambda` (relative tolerance ``tol``
    on :math:`\mathrm{KL}/\rho`). Duals: ``lam`` = :math:`\lambda^\star`, ``eta`` with
    :math:`p = e^{(\ell-\eta)/\lambda}/n` (so :math:`\eta = \lambda\log\frac1n\sum e^{\ell/\lambda}`)."""
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

    def kl_and_var(x: Tensor) -> tuple[Tensor, Tensor]:
        s = Z / torch.exp(x)[:, None]
        lp = torch.log_softmax(s, dim=1)
        p = lp.exp()
        kl = (p * lp).sum(1) + math.log(n)
        sbar = (p * s).sum(1, keepdim=True)
        var = (p * (s - sbar) ** 2).sum(1)
        return kl.clamp(min=0.0), var

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        kl, var = kl_and_var(x)
        return logrho - torch.log(kl), var / kl

    hi = torch.full_like(R, -logrho)  # lambda = range / rho  =>  KL <= rho
    lo = hi - 1.0
    step = 1.0
    for _ in range(64):  # expand the lower end until KL >= rho
        f, _ = fn(lo)
        need = active & (f > 0)
        if not bool(need.any()):
            break
        step *= 2.0
        lo = torch.where(need, lo - step, lo)
    f_lo, _ = fn(lo)
    stuck = active & (f_lo > 0)  # KL -> its max only as lambda -> 0: take the smallest lambda tried
    hi = torch.where(stuck, lo, hi)
    var_u = Z.var(1, unbiased=False)
    x0 = 0.5 * torch.log(var_u / (2.0 * rho))
    x0 = torch.where(torch.isfinite(x0), x0, 0.5 * (lo + hi))
    _, lo, hi, res, conv, iters = newton_bisect(fn, lo, hi, x0, tol=tol, max_iter=max_iter, feasible="hi",
                                                active=active & ~stuck)
    lam_s = torch.exp(hi)  # feasible side: KL <= rho
    s = Z / lam_s[:, None]
    p = torch.softmax(s, dim=1)
    lam = lam_s * Rs
    eta = lmax + lam * (torch.logsumexp(s, dim=1) - math.log(n))
    p = torch.where(inactive[:, None], argmax_uniform(L), p)
    lam = torch.where(inactive, torch.zeros_like(lam), lam)
    eta = torch.where(inactive, lmax, eta)
    conv = conv | inactive | stuck
    res = torch.where(inactive, torch.zeros_like(res), res)
    return Solved(p=p, penalty=torch.zeros_like(lam), eta=eta, lam=lam, divergence=kl_to_uniform(p),
                  converged=conv, iterations=iters, residual=res)

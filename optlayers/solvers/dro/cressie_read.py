r"""Cressie–Read :math:`f`-divergence balls and penalties (Duchi & Namkoong's family).

.. math:: f_k(t) = \frac{t^k - kt + k - 1}{k(k-1)},\quad D_k(p) = \frac1n\sum_i f_k(np_i),\quad
          f_k^*(s) = \frac1k\Big[\big((k-1)s + 1\big)_+^{k/(k-1)} - 1\Big].

Both problems have maximisers :math:`p_i \propto (\ell_i - \tilde\eta)_+^{\beta}`,
:math:`\beta = 1/(k-1)`:

* penalty :math:`\lambda`: :math:`p_i = \frac1n\big(\tfrac{k-1}{\lambda}(\ell_i-\tilde\eta)_+\big)^{\beta}`
  and :math:`\sum_i p_i = 1` fixes :math:`\tilde\eta` — a monotone 1-D root-find on
  :math:`\log\sum_i(\ell_i-\tilde\eta)_+^\beta`;
* ball :math:`\rho`: :math:`p(\tilde\eta)` normalised, :math:`D_k(p(\tilde\eta))` increases in
  :math:`\tilde\eta`; root-find on :math:`\log D_k = \log\rho` in
  :math:`u = \log(\max\ell - \tilde\eta)`, returned on the feasible side (:math:`D_k\le\rho`).
  The multiplier follows from normalisation: :math:`\lambda = (k-1)(\tfrac1n\sum_i
  (\ell_i-\tilde\eta)_+^\beta)^{k-1}`, :math:`\eta = \tilde\eta + \lambda/(k-1)`.

Both root-finds are safeguarded Newton–bisection with analytic derivatives. ``k = 2`` is routed
to the exact :math:`\chi^2` solvers (``D_2`` is half of :class:`ChiSquareBall`'s divergence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...kernels import Backend
from ._common import Solved, argmax_uniform, exact, newton_bisect
from .chi_square import solve_chi2_ball, solve_chi2_penalty

__all__ = ["cressie_read_f", "cressie_read_divergence", "solve_cressie_read"]


def cressie_read_f(t: Tensor, k: float) -> Tensor:
    """:math:`f_k(t)`, accurate near :math:`t = 1`.

    With :math:`h = t - 1`: :math:`(1+h)^k - 1 - kh` is evaluated as
    ``expm1(k log1p(h)) - k h`` for :math:`|h| \\ge 0.01` (relative error below ``1e-14``) and by
    its binomial series (8 terms) for :math:`|h| < 0.01`.
    """
    h = t - 1.0
    small = h.abs() < 0.01
    hs = torch.where(small, h, torch.zeros_like(h))
    coef = k * (k - 1.0) / 2.0
    hp = hs * hs
    series = coef * hp
    for j in range(3, 11):
        coef = coef * (k - j + 1.0) / j
        hp = hp * hs
        series = series + coef * hp
    hl = torch.where(small, torch.ones_like(h), h)
    pw = torch.where(hl > -1.0, torch.expm1(k * torch.log1p(hl.clamp(min=-1.0 + 1e-300))), -torch.ones_like(h))
    direct = pw - k * hl
    return torch.where(small, series, direct) / (k * (k - 1.0))


def cressie_read_divergence(p: Tensor, k: float) -> Tensor:
    """:math:`D_k(p\\|u) = \\frac1n\\sum_i f_k(np_i)` over the last dimension."""
    n = p.shape[-1]
    return cressie_read_f(n * p, k).mean(-1)


def _cr_fprime(t: Tensor, k: float) -> Tensor:
    return (t.clamp(min=0.0) ** (k - 1.0) - 1.0) / (k - 1.0)


def _log_weights(Z: Tensor, x: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``d = (Z - x)_+`` and ``beta log d`` (``-inf`` where ``d = 0``): weights in log space, so
    large ``beta`` (``k`` near 1) neither overflows nor underflows."""
    d = (Z - x[:, None]).clamp(min=0.0)
    pos = d > 0
    lw = torch.where(pos, beta * torch.log(torch.where(pos, d, torch.ones_like(d))), torch.full_like(d, -math.inf))
    return d, lw


def _p_over_d(p: Tensor, d: Tensor) -> Tensor:
    return torch.where(d > 0, p / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(p))


def _solve_ball(Z: Tensor, rho: float, beta: float, k: float, tol: float, max_iter: int,
                active: Tensor):
    """``Z`` has max 0 and range 1 on active rows; unknown ``u`` with ``eta~ = -exp(u)``."""
    B, n = Z.shape
    logrho = math.log(rho)

    def div_and_grad(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = torch.exp(u)
        d, lw = _log_weights(Z, -e, beta)
        p = torch.softmax(lw, dim=1)
        D = cressie_read_divergence(p, k)
        r = _p_over_d(p, d)
        dp = -beta * r + beta * p * r.sum(1, keepdim=True)  # d p / d eta~
        dD = (_cr_fprime(n * p, k) * dp).sum(1)  # d D / d eta~
        return D, dD * (-e), p

    def fn(u: Tensor) -> tuple[Tensor, Tensor]:
        D, dDdu, _ = div_and_grad(u)
        return logrho - torch.log(D), -dDdu / D

    var = Z.var(1, unbiased=False)
    hi = 0.5 * torch.log(beta * beta * var / (2.0 * rho)).nan_to_num(0.0) + 1.0
    step = 1.0
    for _ in range(64):
        f, _ = fn(hi)
        need = active & (f < 0)
        if not bool(need.any()):
            break
        step *= 2.0
        hi = torch.where(need, hi + step, hi)
    lo = hi - 1.0
    step = 1.0
    for _ in range(64):
        f, _ = fn(lo)
        need = active & (f > 0)
        if not bool(need.any()):
            break
        step *= 2.0
        lo = torch.where(need, lo - step, lo)
    f_lo, _ = fn(lo)
    stuck = active & (f_lo > 0)
    hi = torch.where(stuck, lo, hi)
    _, lo, hi, res, conv, iters = newton_bisect(fn, lo, hi, 0.5 * (lo + hi), tol=tol, max_iter=max_iter,
                                                feasible="hi", active=active & ~stuck)
    u = hi  # feasible side: D <= rho
    _, _, p = div_and_grad(u)
    return u, p, res, conv | stuck | ~active, iters


def solve_cressie_read(L: Tensor, k: float, *, rho: float | None, lam: float | None, tol: float,
                       max_iter: int, backend: Backend | str | None = None) -> Solved:
    r"""Cressie–Read ball (``rho``) or penalty (``lam``).

    Duals: ``eta`` and ``lam`` of
    :math:`\min \eta + \lambda\rho + \lambda\frac1n\sum_i f_k^*((\ell_i-\eta)/\lambda)` (for the
    ball ``lam`` is the multiplier of the constraint; for the penalty the given :math:`\lambda`).
    """
    B, n = L.shape
    if k == 2.0:  # D_2 = chi2 / 2
        if rho is not None:
            s = solve_chi2_ball(L, 2.0 * rho, backend=backend)
        else:
            s = solve_chi2_penalty(L, lam / 2.0)  # type: ignore[operator]
        s.lam = 2.0 * s.lam  # multiplier of D_2 = chi2 / 2
        s.eta = s.eta + s.lam  # p = ((l - eta) / lam + 1)_+ / n  vs  the chi2 threshold
        s.divergence = 0.5 * s.divergence
        return s
    beta = 1.0 / (k - 1.0)
    lmax, lmin = L.amax(1), L.amin(1)
    R = lmax - lmin
    flat = R <= 0
    Rs = torch.where(flat, torch.ones_like(R), R)
    Z = (L - lmax[:, None]) / Rs[:, None]
    if lam is not None:
        x, res, conv, iters = _solve_penalty(Z, lam / Rs, beta, k, tol, max_iter)
        _, lw = _log_weights(Z, x, beta)
        p = torch.softmax(lw, dim=1)
        div = cressie_read_divergence(p, k)
        eta = lmax + Rs * x + lam / (k - 1.0)
        return Solved(p=p, penalty=lam * div, eta=eta, lam=torch.full_like(eta, lam), divergence=div,
                      converged=conv, iterations=iters, residual=res)
    assert rho is not None
    n_top = (L == lmax[:, None]).sum(1)
    t_top = n / n_top.to(L.dtype)
    dmax = (n_top.to(L.dtype) * cressie_read_f(t_top, k) + (n - n_top).to(L.dtype) * cressie_read_f(
        torch.zeros_like(t_top), k)) / n
    inactive = flat | (rho >= dmax)
    if rho <= 0.0:
        p = torch.full_like(L, 1.0 / n)
        return exact(p, eta=L.mean(1), lam=torch.full_like(lmax, math.inf), divergence=torch.zeros_like(lmax))
    u, p, res, conv, iters = _solve_ball(Z, rho, beta, k, tol, max_iter, ~inactive)
    xt = -torch.exp(u)
    _, lw = _log_weights(Z, xt, beta)
    lam_s = (k - 1.0) * torch.exp((k - 1.0) * (torch.logsumexp(lw, dim=1) - math.log(n)))
    lam_o = lam_s * Rs
    eta = lmax + Rs * xt + lam_o / (k - 1.0)
    p = torch.where(inactive[:, None], argmax_uniform(L), p)
    eta = torch.where(inactive, lmax, eta)
    lam_o = torch.where(inactive, torch.zeros_like(lam_o), lam_o)
    res = torch.where(inactive, torch.zeros_like(res), res)
    return Solved(p=p, penalty=torch.zeros_like(eta), eta=eta, lam=lam_o,
                  divergence=cressie_read_divergence(p, k), converged=conv | inactive,
                  iterations=iters, residual=res)


def _solve_penalty(Z: Tensor, lam_s: Tensor, beta: float, k: float, tol: float, max_iter: int):
    """Penalty root-find with a per-row (rescaled) :math:`\\lambda`."""
    B, n = Z.shape
    logT = math.log(n) + beta * torch.log(lam_s / (k - 1.0))

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        d, lw = _log_weights(Z, x, beta)
        logS = torch.logsumexp(lw, dim=1)
        p = torch.softmax(lw, dim=1)
        return logT - logS, beta * _p_over_d(p, d).sum(1)

    lo = Z.amin(1) - lam_s / (k - 1.0)
    hi = Z.amax(1)
    x, lo, hi, res, conv, iters = newton_bisect(fn, lo, hi, 0.5 * (lo + hi), tol=tol, max_iter=max_iter)
    return x, res, conv, iters

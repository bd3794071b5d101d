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

Both root-finds are safeguarded Newton–bisection with analytic derivatives (the kernels
``"dro.cr_ball_root"`` and ``"dro.cr_penalty_root"``: PyTorch references here, Numba on the CPU). ``k = 2`` is routed
to the exact :math:`\chi^2` solvers (``D_2`` is half of :class:`ChiSquareBall`'s divergence).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...kernels import Backend, dispatch, register
from ._common import Solved, argmax_uniform, exact, newton_bisect, row_dot
from .chi_square import solve_chi2_ball, solve_chi2_penalty

__all__ = ["cressie_read_f", "cressie_read_divergence", "solve_cressie_read", "cr_ball_root_reference",
           "cr_penalty_root_reference"]


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


def _power_sums(t: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``t^beta`` and the power sums :math:`S_{\beta-1}, S_\beta, S_{\beta+1}` of ``t = (.)_+ in [0, 1]``
    (entries with ``t = 0`` contribute nothing; one transcendental pass)."""
    tb = t.pow(beta)
    s_m = (tb / t.clamp(min=1e-300)).sum(1)
    return tb, s_m, tb.sum(1), row_dot(tb, t)


def _scaled(Z: Tensor, c: Tensor) -> Tensor:
    """``t = (1 + c Z)_+`` row-wise: the weights' bases divided by their maximum."""
    return torch.addcmul(torch.ones_like(Z[:, :1]), Z, c[:, None]).clamp_(min=0.0)


def _cr_ball_fn(Z: Tensor, rho: float, k: float) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    B, n = Z.shape
    beta = 1.0 / (k - 1.0)
    logrho = math.log(rho)
    kk = k * (k - 1.0)
    accurate = kk * rho < 1e-3
    logscale = (k - 1.0) * math.log(n)

    def fn(u: Tensor) -> tuple[Tensor, Tensor]:
        tb, s_m, s_0, s_1 = _power_sums(_scaled(Z, torch.exp(-u)), beta)
        logr = torch.log(s_1) - k * torch.log(s_0)
        scaled_r = torch.exp(logscale + logr)  # n^{k-1} R
        dlogr = (beta + 1.0) * (s_0 / s_1 - s_m / s_0)
        if accurate:
            D = cressie_read_divergence(tb / s_0[:, None], k)
        else:
            D = (scaled_r - 1.0) / kk
        return logrho - torch.log(D), -scaled_r * dlogr / (kk * D)

    return fn


def cr_ball_root_reference(Z: Tensor, rho: float, k: float, u0: Tensor, active: Tensor, *, tol: float,
                           max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The ball search (PyTorch reference of the kernel ``"dro.cr_ball_root"``).

    ``Z`` has max 0 and range 1 on active rows; unknown ``u`` with ``eta~ = -exp(u)``.
    With :math:`t_i = (1 + Z_i e^{-u})_+` and :math:`S_\gamma = \sum_i t_i^\gamma`:
    :math:`p = t^\beta/S_\beta`, :math:`D_k = (n^{k-1}S_{\beta+1}/S_\beta^k - 1)/(k(k-1))` and
    :math:`\mathrm d\log(S_{\beta+1}/S_\beta^k)/\mathrm du = (\beta+1)(S_\beta/S_{\beta+1} -
    S_{\beta-1}/S_\beta)`. The closed form of :math:`D_k` cancels for small divergences, so
    when :math:`k(k-1)\rho < 10^{-3}` the divergence is evaluated term by term instead.
    Returns ``(lo, hi, residual, converged, iterations)`` of :func:`._common.newton_bisect`.
    """
    inf = torch.full_like(u0, math.inf)
    _, lo, hi, res, conv, iters = newton_bisect(_cr_ball_fn(Z, rho, k), -inf, inf, u0, tol=tol,
                                                max_iter=max_iter, feasible="hi", active=active, xmin=-700.0,
                                                xmax=700.0)
    return lo, hi, res, conv, iters


def _solve_ball(Z: Tensor, rho: float, beta: float, k: float, tol: float, max_iter: int,
                active: Tensor, backend: Backend | str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    var = Z.var(1, unbiased=False)
    # small-radius asymptote D ~ beta^2 Var(Z) e^{-2u} / 2
    u0 = 0.5 * torch.log(beta * beta * var / (2.0 * rho))
    u0 = torch.where(torch.isfinite(u0), u0, torch.zeros_like(u0))
    root = dispatch("dro.cr_ball_root", backend=backend, device=Z.device, size=Z.shape[1])
    _, hi, res, conv, iters = root(Z, rho, k, u0, active, tol=tol, max_iter=max_iter)
    hi, res, conv, iters = hi.to(Z.device), res.to(Z.device), conv.to(Z.device), iters.to(Z.device)
    u = torch.where(torch.isfinite(hi), hi, u0)  # feasible side: D <= rho
    tb, _, s_0, _ = _power_sums(_scaled(Z, torch.exp(-u)), beta)
    p = tb / s_0[:, None]
    return u, p, s_0, res, conv | ~active, iters


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
        x, p, res, conv, iters = _solve_penalty(Z, lam / Rs, beta, k, tol, max_iter, backend)
        div = cressie_read_divergence(p, k)
        eta = lmax + Rs * x + lam / (k - 1.0)
        return Solved(p=p, penalty=lam * div, eta=eta, lam=torch.full_like(eta, lam), divergence=div,
                      converged=conv, iterations=iters, residual=res)
    assert rho is not None
    n_top = (L == lmax[:, None]).sum(1)
    t_top = n / n_top.to(L.dtype)
    # f_k(0) = 1/k exactly
    dmax = (n_top.to(L.dtype) * cressie_read_f(t_top, k) + (n - n_top).to(L.dtype) / k) / n
    inactive = flat | (rho >= dmax)
    if rho <= 0.0:
        p = torch.full_like(L, 1.0 / n)
        return exact(p, eta=L.mean(1), lam=torch.full_like(lmax, math.inf), divergence=torch.zeros_like(lmax))
    u, p, s_0, res, conv, iters = _solve_ball(Z, rho, beta, k, tol, max_iter, ~inactive, backend)
    e = torch.exp(u)
    xt = -e
    # lambda = (k-1) (mean_i d_i^beta)^{k-1} with d = e t:  log mean d^beta = beta u + log(S_beta / n)
    lam_s = (k - 1.0) * torch.exp((k - 1.0) * (beta * u + torch.log(s_0 / n)))
    lam_o = lam_s * Rs
    eta = lmax + Rs * xt + lam_o / (k - 1.0)
    if bool(inactive.any()):
        p = torch.where(inactive[:, None], argmax_uniform(L), p)
    eta = torch.where(inactive, lmax, eta)
    lam_o = torch.where(inactive, torch.zeros_like(lam_o), lam_o)
    res = torch.where(inactive, torch.zeros_like(res), res)
    return Solved(p=p, penalty=torch.zeros_like(eta), eta=eta, lam=lam_o,
                  divergence=cressie_read_divergence(p, k), converged=conv | inactive,
                  iterations=iters, residual=res)


def cr_penalty_root_reference(Z: Tensor, logT: Tensor, beta: float, lo: Tensor, hi: Tensor, *, tol: float,
                              max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The penalty search (PyTorch reference of the kernel ``"dro.cr_penalty_root"``): the
    threshold :math:`x < 0 = \max Z` with :math:`\beta\log(-x) + \log S_\beta(t) = \log T`,
    :math:`t_i = (1 - Z_i/x)_+`, in the bracket ``[lo, hi]`` from its midpoint.
    Returns ``(x, lo, hi, residual, converged, iterations)`` of :func:`._common.newton_bisect`."""

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        m = (-x).clamp(min=1e-300)
        _, s_m, s_0, _ = _power_sums(_scaled(Z, 1.0 / m), beta)
        return logT - beta * torch.log(m) - torch.log(s_0), beta * s_m / (m * s_0)

    return newton_bisect(fn, lo, hi, 0.5 * (lo + hi), tol=tol, max_iter=max_iter)


def _solve_penalty(Z: Tensor, lam_s: Tensor, beta: float, k: float, tol: float,
                   max_iter: int, backend: Backend | str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Penalty root-find with a per-row (rescaled) :math:`\lambda`: the threshold
    :math:`x < 0 = \max Z` solves :math:`\sum_i (Z_i - x)_+^\beta = n(\lambda/(k-1))^\beta`, written
    with :math:`t_i = (1 - Z_i/x)_+` as :math:`\beta\log(-x) + \log S_\beta(t) = \log T`."""
    B, n = Z.shape
    logT = math.log(n) + beta * torch.log(lam_s / (k - 1.0))
    lo = Z.amin(1) - lam_s / (k - 1.0)
    hi = Z.amax(1)
    root = dispatch("dro.cr_penalty_root", backend=backend, device=Z.device, size=n)
    x, lo, hi, res, conv, iters = root(Z, logT, beta, lo, hi, tol=tol, max_iter=max_iter)
    x, res, conv, iters = x.to(Z.device), res.to(Z.device), conv.to(Z.device), iters.to(Z.device)
    tb, _, s_0, _ = _power_sums(_scaled(Z, 1.0 / (-x).clamp(min=1e-300)), beta)
    return x, tb / s_0[:, None], res, conv, iters


def _load_ball() -> Callable[..., Any]:
    from ...kernels.dro_kernels import cr_ball_root_numba

    return cr_ball_root_numba


def _load_penalty() -> Callable[..., Any]:
    from ...kernels.dro_kernels import cr_penalty_root_numba

    return cr_penalty_root_numba


register("dro.cr_ball_root", Backend.REFERENCE, lambda: cr_ball_root_reference)
register("dro.cr_ball_root", Backend.NUMBA, _load_ball)
register("dro.cr_penalty_root", Backend.REFERENCE, lambda: cr_penalty_root_reference)
register("dro.cr_penalty_root", Backend.NUMBA, _load_penalty)

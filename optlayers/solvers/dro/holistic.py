r"""Holistic robustness (Bennouna, Lucas & Van Parys, "Holistic Robust Data-Driven Decisions").

Atoms :math:`v = (\ell_1,\dots,\ell_n, v_{\max})` with :math:`v_{\max} = \max_i\ell_i`:

.. math:: \max_{p,q\in\Delta_{n+1}} \langle p, v\rangle\quad\text{s.t.}\quad
          q_i = \tfrac1n - s_i,\ s\ge0,\ \textstyle\sum_i s_i\le\alpha,\qquad
          \mathrm{KL}(q\|p)\le r .

Closed form, no per-batch conic program:

1. *poisoning*: :math:`q` moves mass :math:`\alpha` from the smallest losses to the extra atom
   (a sort; losses tied at the boundary share the removal equally);
2. *reverse-KL ball*: the value is
   :math:`\min_{\eta>v_{\max}} \eta - e^{-r}\exp\big(\sum_i q_i\log(\eta - v_i)\big)`, a 1-D
   convex problem; its stationarity condition
   :math:`-r + \sum_i q_i\log(\eta-v_i) + \log\sum_i q_i/(\eta-v_i) = 0` is monotone in
   :math:`u = \log(\eta - v_{\max})` and solved by safeguarded Newton–bisection. Then
   :math:`p_i \propto q_i/(\eta^\star - v_i)`, returned on the feasible side
   (:math:`\mathrm{KL}(q\|p)\le r`).

The extra atom's weight goes to the maximal loss(es) (it carries :math:`\max\ell`), so the
weights are over the ``n`` losses and the Danskin gradient includes :math:`\nabla\max_i\ell_i`.
``r = 0`` gives ``TotalVariation(alpha)``; ``alpha = r = 0`` the mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import Solved, argmax_uniform, exact, newton_bisect, tie_average

__all__ = ["holistic_poisoned_weights", "solve_holistic"]


def holistic_poisoned_weights(L: Tensor, alpha: float) -> Tensor:
    """The poisoned nominal weights ``q`` over the ``n`` losses (the extra atom carries ``alpha``)."""
    B, n = L.shape
    s, idx = torch.sort(L, dim=1, stable=True)
    i = torch.arange(n, dtype=L.dtype, device=L.device)
    removed = (alpha - i / n).clamp(min=0.0, max=1.0 / n)
    qs = tie_average(s, (1.0 / n - removed).expand(B, n).contiguous())
    return torch.empty_like(L).scatter_(1, idx, qs)


def solve_holistic(L: Tensor, alpha: float, r: float, *, tol: float, max_iter: int) -> Solved:
    r"""HR weights. Duals: ``eta`` = :math:`\eta^\star`, ``lam`` = :math:`\lambda =
    e^{-r}\prod_i(\eta^\star-v_i)^{q_i}` (so :math:`p_i = \lambda q_i/(\eta^\star - v_i)`);
    divergence :math:`\mathrm{KL}(q\|p)` over the ``n + 1`` atoms."""
    B, n = L.shape
    q = holistic_poisoned_weights(L, alpha)
    pmax = argmax_uniform(L)
    lmax, lmin = L.amax(1), L.amin(1)
    if r <= 0.0:
        p = q + alpha * pmax
        return exact(p, eta=torch.full_like(lmax, math.inf), lam=torch.zeros_like(lmax),
                     divergence=torch.zeros_like(lmax))
    R = lmax - lmin
    # all atoms carrying mass have the same loss: nothing to move
    qmask = q > 0
    spread = torch.where(qmask, L, torch.full_like(L, math.inf)).amin(1)
    flat = (lmax - spread) <= 0
    Rs = torch.where(flat, torch.ones_like(R), R)
    delta = (lmax[:, None] - L) / Rs[:, None]  # in [0, 1]
    qa = torch.cat([q, torch.full_like(q[:, :1], alpha)], 1)
    da = torch.cat([delta, torch.zeros_like(delta[:, :1])], 1)
    logq = torch.where(qa > 0, torch.log(torch.where(qa > 0, qa, torch.ones_like(qa))), torch.full_like(qa, -math.inf))

    def parts(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gap = torch.exp(u)[:, None] + da  # eta - v_i, rescaled
        lg = torch.log(gap)
        G = (qa * lg).sum(1)  # log geometric mean
        lH_terms = logq - lg
        lH = torch.logsumexp(lH_terms, 1)
        lK = torch.logsumexp(logq - 2.0 * lg, 1)
        return G, lH, lK

    def fn(u: Tensor) -> tuple[Tensor, Tensor]:
        G, lH, lK = parts(u)
        g = r - G - lH  # increasing in u; >= 0 is the feasible side
        # dg/du = e^u (K - H^2) / H = e^u (exp(lK - lH) - exp(lH))
        dg = torch.exp(u) * (torch.exp(lK - lH) - torch.exp(lH))
        return g, dg

    active = ~flat
    var = (qa * da * da).sum(1) - (qa * da).sum(1) ** 2
    hi = 0.5 * torch.log((var / (2.0 * r)).clamp(min=1e-300)) + 1.0
    step = 1.0
    for _ in range(64):
        g, _ = fn(hi)
        need = active & (g < 0)
        if not bool(need.any()):
            break
        step *= 2.0
        hi = torch.where(need, hi + step, hi)
    lo = hi - 1.0
    step = 1.0
    for _ in range(64):
        g, _ = fn(lo)
        need = active & (g > 0)
        if not bool(need.any()):
            break
        step *= 2.0
        lo = torch.where(need, lo - step, lo)
    g_lo, _ = fn(lo)
    stuck = active & (g_lo > 0)
    hi = torch.where(stuck, lo, hi)
    _, lo, hi, res, conv, iters = newton_bisect(fn, lo, hi, 0.5 * (lo + hi), tol=tol, max_iter=max_iter, feasible="hi",
                                                active=active & ~stuck)
    u = hi
    gap = torch.exp(u)[:, None] + da
    wts = torch.where(qa > 0, qa / gap, torch.zeros_like(qa))
    pa = wts / wts.sum(1, keepdim=True)
    p = pa[:, :n] + pa[:, n:] * pmax
    G, lH, _ = parts(u)
    lam = Rs * torch.exp(G - r)
    eta = lmax + Rs * torch.exp(u)
    kl = torch.where(qa > 0, qa * (logq - torch.log(pa.clamp(min=1e-300))), torch.zeros_like(qa)).sum(1)
    p = torch.where(flat[:, None], q + alpha * pmax, p)
    eta = torch.where(flat, torch.full_like(eta, math.inf), eta)
    lam = torch.where(flat, torch.zeros_like(lam), lam)
    kl = torch.where(flat, torch.zeros_like(kl), kl)
    res = torch.where(flat, torch.zeros_like(res), res)
    return Solved(p=p, penalty=torch.zeros_like(eta), eta=eta, lam=lam, divergence=kl,
                  converged=conv | flat | stuck, iterations=iters, residual=res)

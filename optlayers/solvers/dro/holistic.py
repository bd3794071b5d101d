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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...kernels import Backend, dispatch, register
from ._common import Solved, argmax_uniform, exact, newton_bisect, row_dot

__all__ = ["holistic_poisoned_weights", "solve_holistic", "holistic_root_reference"]


def holistic_poisoned_weights(L: Tensor, alpha: float) -> Tensor:
    """The poisoned nominal weights ``q`` over the ``n`` losses (the extra atom carries ``alpha``).

    The mass :math:`\\alpha` is removed from the smallest losses, :math:`1/n` each; losses tied at
    the boundary share the removal equally. A selection (``kthvalue``), not a sort: with
    :math:`m = \\alpha n`, the :math:`\\lceil m\\rceil`-th smallest loss :math:`\\tau`, :math:`n_<`
    losses below it and :math:`n_=` equal to it, the losses below lose everything and those equal
    to :math:`\\tau` lose :math:`\\min(m - n_<, n_=)/(n\\,n_=)` each.
    """
    B, n = L.shape
    m = alpha * n
    if m <= 0.0:
        return torch.full_like(L, 1.0 / n)
    if m >= n:
        return torch.zeros_like(L)
    j = min(max(math.ceil(m), 1), n)
    tau = torch.kthvalue(L, j, dim=1).values[:, None]
    below = L < tau
    eq = L == tau
    n_below = below.sum(1, keepdim=True).to(L.dtype)
    n_eq = eq.sum(1, keepdim=True).to(L.dtype)
    share = (m - n_below).clamp(min=0.0).minimum(n_eq) / (n * n_eq)
    q = torch.where(eq, 1.0 / n - share, torch.full_like(L, 1.0 / n))
    return torch.where(below, torch.zeros_like(L), q).clamp(min=0.0)


def _parts(delta: Tensor, q: Tensor, alpha: float, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = delta * torch.exp(-u)[:, None]
    lg = torch.log(y + 1.0)
    w = (y + 1.0).reciprocal_()
    qw = q * w
    G1 = row_dot(q, lg)  # sum_i q_i log(1 + y_i); the extra atom adds 0
    h = qw.sum(1) + alpha
    k2 = row_dot(qw, w) + alpha
    return G1, h, k2, qw


def holistic_root_reference(delta: Tensor, q: Tensor, alpha: float, r: float, u0: Tensor, active: Tensor, *,
                            tol: float, max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The search of :func:`solve_holistic` (PyTorch reference of the kernel ``"dro.holistic_root"``):
    root of :math:`g(u) = r - \sum_i q_i\log(1+y_i) - \log(\alpha + \sum_i q_i/(1+y_i))`,
    :math:`y_i = \delta_i e^{-u}`, feasible side ``hi``. Returns ``(lo, hi, residual, converged,
    iterations)`` of :func:`._common.newton_bisect`."""

    def fn(u: Tensor) -> tuple[Tensor, Tensor]:
        G1, h, k2, _ = _parts(delta, q, alpha, u)
        return r - G1 - torch.log(h), (k2 - h * h) / h  # increasing in u; >= 0 is the feasible side

    inf = torch.full_like(u0, math.inf)
    _, lo, hi, res, conv, iters = newton_bisect(fn, -inf, inf, u0, tol=tol, max_iter=max_iter, feasible="hi",
                                                active=active, xmin=-700.0, xmax=700.0)
    return lo, hi, res, conv, iters


def _load_numba() -> Callable[..., Any]:
    from ...kernels.dro_kernels import holistic_root_numba

    return holistic_root_numba


register("dro.holistic_root", Backend.REFERENCE, lambda: holistic_root_reference)
register("dro.holistic_root", Backend.NUMBA, _load_numba)


def solve_holistic(L: Tensor, alpha: float, r: float, *, tol: float, max_iter: int,
                   backend: Backend | str | None = None) -> Solved:
    r"""HR weights. Duals: ``eta`` = :math:`\eta^\star`, ``lam`` = :math:`\lambda =
    e^{-r}\prod_i(\eta^\star-v_i)^{q_i}` (so :math:`p_i = \lambda q_i/(\eta^\star - v_i)`);
    divergence :math:`\mathrm{KL}(q\|p)` over the ``n + 1`` atoms.

    The root-find works with :math:`y_i = \delta_i e^{-u}` (:math:`\delta_i = (v_{\max}-v_i)/R`):
    :math:`g(u) = r - \sum_i q_i\log(1+y_i) - \log\sum_i q_i/(1+y_i)` and
    :math:`g'(u) = (\sum_i q_i w_i^2 - h^2)/h` with :math:`w_i = 1/(1+y_i)`,
    :math:`h = \sum_i q_i w_i` (the :math:`u` terms cancel exactly). It is the kernel
    ``"dro.holistic_root"`` (PyTorch reference, Numba on the CPU).
    """
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
    delta = (lmax[:, None] - L) / Rs[:, None]  # in [0, 1]; the extra atom (delta = 0) is added by hand

    active = ~flat
    var = (q * delta * delta).sum(1) - (q * delta).sum(1) ** 2
    u0 = 0.5 * torch.log((var / (2.0 * r)).clamp(min=1e-300))
    root = dispatch("dro.holistic_root", backend=backend, device=L.device, size=n)
    _, hi, res, conv, iters = root(delta, q, alpha, r, u0, active, tol=tol, max_iter=max_iter)
    hi, res, conv, iters = hi.to(L.device), res.to(L.device), conv.to(L.device), iters.to(L.device)
    u = torch.where(torch.isfinite(hi), hi, u0)
    G1, h, _, qw = _parts(delta, q, alpha, u)
    p = qw / h[:, None] + (alpha / h)[:, None] * pmax
    lam = Rs * torch.exp(u + G1 - r)
    eta = lmax + Rs * torch.exp(u)
    # KL(q || p) over the n + 1 atoms: p_i / q_i = w_i / h (w = 1 on the extra atom)
    kl = torch.log(h) + G1
    p = torch.where(flat[:, None], q + alpha * pmax, p)
    eta = torch.where(flat, torch.full_like(eta, math.inf), eta)
    lam = torch.where(flat, torch.zeros_like(lam), lam)
    kl = torch.where(flat, torch.zeros_like(kl), kl)
    res = torch.where(flat, torch.zeros_like(res), res)
    return Solved(p=p, penalty=torch.zeros_like(eta), eta=eta, lam=lam, divergence=kl,
                  converged=conv | flat, iterations=iters, residual=res)

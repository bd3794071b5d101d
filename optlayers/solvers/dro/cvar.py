r"""CVaR (superquantile), KL-smoothed CVaR and the total-variation ball.

CVaR of tail fraction :math:`\alpha` (Rockafellar & Uryasev):

.. math:: \max_{p\in\Delta_n,\ p_i\le 1/(\alpha n)} \langle p,\ell\rangle
          = \min_\eta\ \eta + \frac{1}{\alpha n}\sum_i(\ell_i-\eta)_+ .

Exact solution: with :math:`k = \lceil \alpha n\rceil` and :math:`\tau` the :math:`k`-th largest
loss, losses above :math:`\tau` get :math:`1/(\alpha n)` and the losses tied at :math:`\tau`
share the remaining mass (the fractional atom when :math:`\alpha n\notin\mathbb{Z}`). The dual
:math:`\eta^\star = \tau` is the value at risk. This is a selection, not a sort: :math:`O(n)`.

The kernel ``"dro.cvar"`` (``fn(L, alpha) -> (p, tau)`` on a ``(B, n)`` float64 batch) has this
PyTorch reference and a Numba version in :mod:`optlayers.kernels.dro_kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...kernels import Backend, dispatch, register
from ._common import Solved, argmax_uniform, exact, kl_to_uniform, newton_bisect

__all__ = ["cvar_reference", "solve_cvar", "solve_cvar_smoothed", "solve_total_variation", "cvar_k"]


def cvar_k(alpha: float, n: int) -> int:
    """Number of atoms with positive weight in the (untied) CVaR maximiser: ``ceil(alpha n)``."""
    return min(n, max(1, math.ceil(alpha * n * (1.0 - 1e-12))))


def cvar_reference(L: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Exact CVaR weights (PyTorch reference). ``L``: ``(B, n)``; returns ``(p, tau)``."""
    B, n = L.shape
    k = cvar_k(alpha, n)
    tau = torch.kthvalue(L, n - k + 1, dim=1).values
    above = L > tau[:, None]
    tied = L == tau[:, None]
    cap = 1.0 / (alpha * n)
    rest = (1.0 - cap * above.sum(1).to(L.dtype)) / tied.sum(1).to(L.dtype)
    p = torch.where(above, torch.full_like(L, cap), torch.where(tied, rest[:, None].expand_as(L), torch.zeros_like(L)))
    return p, tau


def _load_numba() -> Callable[..., Any]:
    from ...kernels.dro_kernels import cvar_numba

    return cvar_numba


register("dro.cvar", Backend.REFERENCE, lambda: cvar_reference)
register("dro.cvar", Backend.NUMBA, _load_numba, min_size=2048)


def solve_cvar(L: Tensor, alpha: float, *, backend: Backend | str | None = None) -> Solved:
    """Exact CVaR weights; duals ``eta`` = VaR, ``lam`` = 0; divergence = ``max_i n p_i``."""
    fn = dispatch("dro.cvar", backend=backend, device=L.device, size=L.shape[-1])
    p, tau = fn(L, alpha)
    return exact(p, eta=tau, divergence=(p * L.shape[-1]).amax(-1))


def solve_total_variation(L: Tensor, eps: float, *, backend: Backend | str | None = None) -> Solved:
    r"""TV ball: :math:`(1-\varepsilon)\,p^{\mathrm{CVaR}_{1-\varepsilon}} + \varepsilon\,p^{\max}`.

    Duals: ``eta`` is the VaR of the CVaR part; divergence is :math:`\tfrac12\|p-u\|_1`.
    """
    n = L.shape[-1]
    pmax = argmax_uniform(L)
    if eps >= 1.0:
        p, tau = pmax, L.amax(-1)
    elif eps <= 0.0:
        p, tau = torch.full_like(L, 1.0 / n), L.amin(-1)
    else:
        fn = dispatch("dro.cvar", backend=backend, device=L.device, size=n)
        pc, tau = fn(L, 1.0 - eps)
        p = (1.0 - eps) * pc + eps * pmax
    return exact(p, eta=tau, divergence=0.5 * (p - 1.0 / n).abs().sum(-1))


def solve_cvar_smoothed(L: Tensor, alpha: float, s: float, *, tol: float, max_iter: int) -> Solved:
    r"""KL-smoothed CVaR: :math:`\max_{p_i\le 1/(\alpha n)} \langle p,\ell\rangle - s\,\mathrm{KL}(p\|u)`.

    :math:`p_i = t_i/\sum_j t_j` with :math:`t_i = \min(e^{(\ell_i-\eta)/s-1}, 1/\alpha)` and
    :math:`\eta` the root of :math:`\log\frac1n\sum_i t_i(\eta) = 0`, found by safeguarded
    Newton–bisection (tolerance ``tol`` on that log-sum). The side with
    :math:`\sum_i t_i\ge n` is returned, so the caps hold exactly after normalisation.
    Duals: ``eta`` = :math:`\eta`, ``lam`` = :math:`s`.
    """
    B, n = L.shape
    logcap = -math.log(alpha)
    logn = math.log(n)

    def logt(eta: Tensor) -> Tensor:
        return torch.clamp((L - eta[:, None]) / s - 1.0, max=logcap)

    def fn(eta: Tensor) -> tuple[Tensor, Tensor]:
        lt = logt(eta)
        lse = torch.logsumexp(lt, dim=1)
        w = torch.softmax(lt, dim=1)
        uncapped = (L - eta[:, None]) / s - 1.0 < logcap
        return logn - lse, (w * uncapped).sum(1) / s

    lo = L.amin(1) - s
    hi = L.amax(1) - s
    x0 = s * (torch.logsumexp(L / s, dim=1) - logn) - s
    _, lo, hi, res, conv, iters = newton_bisect(fn, lo, hi, x0, tol=tol, max_iter=max_iter, feasible="lo")
    eta = lo  # feasible side: sum t >= n
    t = torch.exp(logt(eta) - logt(eta).amax(1, keepdim=True))
    p = t / t.sum(1, keepdim=True)
    p = torch.minimum(p, torch.full_like(p, 1.0 / (alpha * n)))
    p = p / p.sum(1, keepdim=True)
    kl = kl_to_uniform(p)
    return Solved(p=p, penalty=s * kl, eta=eta, lam=torch.full_like(eta, s), divergence=kl,
                  converged=conv, iterations=iters, residual=res)

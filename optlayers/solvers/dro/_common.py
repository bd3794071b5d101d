"""Shared pieces of the DRO inner solvers.

All solvers here work on a flat float64 batch of finite losses ``L`` of shape ``(B, n)`` (the
front end in :mod:`.robust_weights` flattens, upcasts and screens non-finite rows) and return a
:class:`Solved` record. Weights are computed without gradient; the differentiable robust value
is assembled by the front end (Danskin).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Solved",
    "exact",
    "newton_bisect",
    "simplex_threshold",
    "tie_average",
    "argmax_uniform",
    "kl_to_uniform",
    "chi2_to_uniform",
    "row_dot",
]


@dataclasses.dataclass
class Solved:
    """What an inner solver returns for a flat batch of ``B`` rows.

    The robust value is ``<p, L> - penalty``; ``eta``/``lam`` are the dual variables (their
    meaning is spec-specific and documented in :mod:`.robust_weights`).
    """

    p: Tensor
    penalty: Tensor
    eta: Tensor
    lam: Tensor
    divergence: Tensor
    converged: Tensor
    iterations: Tensor
    residual: Tensor
    #: every row converged by construction (a closed form): the front end skips the check
    closed_form: bool = False
    #: ``penalty`` is identically zero (a ball): the front end skips the subtraction
    zero_penalty: bool = False


def exact(p: Tensor, *, penalty: Tensor | None = None, eta: Tensor | None = None,
          lam: Tensor | None = None, divergence: Tensor | None = None) -> Solved:
    """Wrap the output of a closed-form (tolerance-free) solver."""
    B = p.shape[0]
    zeros = p.new_zeros(B)
    return Solved(
        p=p,
        penalty=zeros if penalty is None else penalty,
        eta=torch.full_like(zeros, math.nan) if eta is None else eta,
        lam=zeros if lam is None else lam,
        divergence=torch.full_like(zeros, math.nan) if divergence is None else divergence,
        converged=torch.ones(B, dtype=torch.bool, device=p.device),
        iterations=torch.zeros(B, dtype=torch.int64, device=p.device),
        residual=(p.sum(-1) - 1.0).abs(),
        closed_form=True,
        zero_penalty=penalty is None,
    )


def kl_to_uniform(p: Tensor) -> Tensor:
    """:math:`\\mathrm{KL}(p\\|u) = \\sum_i p_i \\log(n p_i)` over the last dimension."""
    n = p.shape[-1]
    pos = p > 0
    return torch.where(pos, p * torch.log(torch.where(pos, p * n, torch.ones_like(p))), torch.zeros_like(p)).sum(-1)


def chi2_to_uniform(p: Tensor) -> Tensor:
    """:math:`\\frac1n\\sum_i (n p_i - 1)^2` over the last dimension."""
    n = p.shape[-1]
    return ((n * p - 1.0) ** 2).sum(-1) / n


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two ``(B, n)`` tensors in one pass (a batched matrix product)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


def argmax_uniform(L: Tensor) -> Tensor:
    """Uniform weights over the entries tied at the row maximum (deterministic tie-breaking)."""
    top = L == L.amax(-1, keepdim=True)
    t = top.to(L.dtype)
    return t / t.sum(-1, keepdim=True)


def tie_average(s_sorted: Tensor, w: Tensor) -> Tensor:
    """Average ``w`` over runs of equal values of the sorted rows ``s_sorted`` (both ``(B, n)``).

    Gives tied losses equal weights, so the result does not depend on how a sort ordered them.
    """
    B, n = s_sorted.shape
    if n == 1:
        return w
    new = torch.ones_like(s_sorted, dtype=torch.bool)
    new[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
    if bool(new.all()):
        return w
    seg = torch.cumsum(new.to(torch.int64), dim=1) - 1 + (torch.arange(B, device=w.device) * n)[:, None]
    seg = seg.reshape(-1)
    sums = torch.zeros(B * n, dtype=w.dtype, device=w.device).index_add_(0, seg, w.reshape(-1))
    cnt = torch.zeros(B * n, dtype=w.dtype, device=w.device).index_add_(0, seg, torch.ones_like(w).reshape(-1))
    return (sums[seg] / cnt[seg]).reshape(B, n)


def simplex_threshold(s_desc: Tensor, c: Tensor, mass: float | Tensor = 1.0) -> Tensor:
    """Threshold :math:`\\eta` with :math:`\\sum_i c\\,(s_i - \\eta)_+ = \\text{mass}`.

    ``s_desc`` is sorted in descending order (``(B, n)``), ``c`` of shape ``(B,)`` is positive and
    finite. This is the sort-and-cumsum Euclidean simplex projection written for a scaled input:
    :math:`\\Pi_\\Delta(a + c\\,s) = c\\,(s - \\eta)_+` for any constant ``a``.
    """
    B, n = s_desc.shape
    k = torch.arange(1, n + 1, dtype=s_desc.dtype, device=s_desc.device)
    cs = torch.cumsum(s_desc, dim=1)
    eta_k = (cs - (mass / c)[:, None] if isinstance(mass, Tensor) else cs - mass / c[:, None]) / k
    valid = s_desc > eta_k
    # the largest valid k (k = 1 is always valid)
    kstar = (valid.to(torch.int64) * torch.arange(1, n + 1, device=s_desc.device)).amax(1).clamp(min=1)
    return eta_k.gather(1, (kstar - 1)[:, None]).squeeze(1)


def newton_bisect(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    lo: Tensor,
    hi: Tensor,
    x0: Tensor,
    *,
    tol: float,
    max_iter: int,
    feasible: str | None = None,
    xtol: float = 4e-16,
    active: Tensor | None = None,
    jump: float = 1.0,
    xmin: float = -math.inf,
    xmax: float = math.inf,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Safeguarded Newton–bisection for a batch of increasing scalar functions.

    The one 1-D root-finder of the DRO solvers (KL ball, Cressie–Read, holistic robustness,
    smoothed CVaR). Finds the root of ``f`` (``fn(x) -> (f, df)``, elementwise over ``(B,)``)
    with ``f(lo) <= 0 <= f(hi)``. An end of the bracket may be infinite (not yet known): the
    search then *expands* towards it by Newton steps capped at a length that doubles after every
    capped step (starting at ``jump``), so bracketing and refining share every function
    evaluation. Once both ends are finite, a Newton step that leaves the open bracket, has a
    non-positive derivative, or fails to halve the bracket in two steps is replaced by bisection,
    so each element converges at least linearly.

    With ``feasible="hi"`` (``"lo"``) only points with ``f >= 0`` (``f <= 0``) count as solutions:
    an element stops when such a point has ``|f| <= tol``, and Newton steps taken from the other
    side overshoot slightly so the iterates cross over (Newton on a convex function otherwise
    approaches from one side only); Newton then aims at ``f = +-tol/2``, inside the acceptance band.
    With ``feasible=None`` any ``|f| <= tol`` stops. An element
    also stops when its bracket is narrower than ``xtol * (1 + |x|)`` (machine precision), or when
    it sits at an end of the domain ``[xmin, xmax]`` with the root beyond it and that end on the
    feasible side (it is then the best representable point).

    There is one host synchronisation per iteration (the all-done test).

    Args:
        fn: Increasing function and derivative.
        lo, hi: Bracket ``(B,)``; ``-inf``/``+inf`` where unknown.
        x0: Starting point (moved inside the bracket if outside).
        tol: Absolute tolerance on ``f``.
        max_iter: Limit on evaluations of ``fn`` in the loop.
        feasible: Which side of the root is feasible (``"hi"``, ``"lo"`` or None).
        xtol: Relative bracket-width tolerance.
        active: Optional bool mask of elements to solve (others are returned as converged).
        jump: First cap on a step towards an unknown bracket end.
        xmin, xmax: Domain of ``x``; iterates are clipped into it.

    Returns:
        ``(x, lo, hi, residual, converged, iterations)``; the bracket still satisfies
        ``f(lo) <= 0 <= f(hi)`` and the feasible end is within ``tol`` when converged (an end
        that was never reached stays infinite).
    """
    inside = (x0 > lo) & (x0 < hi)
    both = torch.isfinite(lo) & torch.isfinite(hi)
    x = torch.where(inside, x0, torch.where(both, 0.5 * (lo + hi), torch.where(torch.isfinite(lo), lo + jump,
                                                                               hi - jump)))
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).clamp(min=xmin, max=xmax)
    B = x.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=x.device) if active is None else ~active
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    res = torch.zeros_like(x)
    cap = torch.full_like(x, jump)
    width_prev = (hi - lo).abs()
    # Newton aims at the middle of the acceptance band on the feasible side, so it lands there
    # instead of creeping towards the root from the infeasible side
    target = 0.5 * tol if feasible == "hi" else (-0.5 * tol if feasible == "lo" else 0.0)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        f, df = fn(x)
        f = torch.where(done, torch.zeros_like(f), f)
        res = torch.where(done, res, f.abs())
        iters = iters + (~done).to(torch.int64)
        lo = torch.where(~done & (f <= 0), x, lo)
        hi = torch.where(~done & (f >= 0), x, hi)
        width = hi - lo
        if feasible == "hi":
            wrong = f < 0
        elif feasible == "lo":
            wrong = f > 0
        else:
            wrong = torch.zeros_like(done)
        edge = torch.zeros_like(done)
        if feasible != "lo":  # the root is below xmin and xmin is feasible
            edge = edge | ((x <= xmin) & (f > 0))
        if feasible != "hi":
            edge = edge | ((x >= xmax) & (f < 0))
        newly = ((f.abs() <= tol) & ~wrong) | (width <= xtol * (1.0 + x.abs())) | edge
        done = done | newly
        delta = (f - target) / df
        step = x - torch.where(wrong, 1.001 * delta, delta)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        # the halving test starts when the bracket first closes
        width_prev = torch.where(torch.isinf(width_prev) & finite, 2.0 * width, width_prev)
        # bracketed: bisection whenever Newton misbehaves
        bad = ~torch.isfinite(step) | (df <= 0) | (step <= lo) | (step >= hi) | (width > 0.5 * width_prev)
        width_prev = torch.where(bad, width, width_prev)
        nxt = torch.where(bad, 0.5 * (lo + hi), step)
        # not yet bracketed: a capped Newton step towards the unknown end (or a capped jump)
        up = f < 0
        ok = torch.isfinite(step) & (df > 0) & (step > lo) & (step < hi)
        capped = ~ok | ((step - x).abs() > cap)
        towards = torch.where(up, x + cap, x - cap)
        ext = torch.where(capped, towards, step)
        cap = torch.where(~finite & capped, 2.0 * cap, cap)
        nxt = torch.where(finite, nxt, ext).clamp(min=xmin, max=xmax)
        x = torch.where(done, x, nxt)
    if not bool(done.all()):
        # one more evaluation so the residual and the bracket describe the returned point
        f, _ = fn(x)
        res = torch.where(done, res, f.abs())
        lo = torch.where(~done & (f <= 0), x, lo)
        hi = torch.where(~done & (f >= 0), x, hi)
        ok = f.abs() <= tol
        if feasible == "hi":
            ok = ok & (f >= 0)
        elif feasible == "lo":
            ok = ok & (f <= 0)
        done = done | ok
    return x, lo, hi, res, done, iters

"""Batched derivatives, linear solves and line searches shared by the generic solvers.

All act on a batch of independent problems stored flat (iterates ``(B, n)``), per element,
with out-of-place operations (differentiable under autograd) and no host synchronisation
unless ``sync=True`` allows an early exit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._base import Fn, check_output, masked

__all__ = ["Step", "batched_jacobian", "batched_value_and_grad", "line_search", "merit", "solve_or_pinv"]

ARMIJO_C1 = 1e-4
WOLFE_C2 = 0.9
MAX_TRIALS = 30


def _vmap_or_loop(fn: Fn, basis: torch.Tensor) -> torch.Tensor:
    try:
        return torch.func.vmap(fn)(basis)
    except Exception:  # functions that cannot be vmapped: a loop is always correct
        return torch.stack([fn(basis[k]) for k in range(basis.shape[0])])


def batched_jacobian(fn: Fn, z: torch.Tensor, m: int) -> torch.Tensor:
    r"""Per-element Jacobians ``J_b = ∂fn(z)_b / ∂z_b`` of a batch of independent maps.

    ``fn: (B, n) -> (B, m)`` acts element-wise on the batch, so one JVP with the tangent
    ``e_k`` broadcast to ``(B, n)`` gives column ``k`` of every element's Jacobian; the
    ``n`` JVPs are vmapped. When ``m < n`` the ``m`` rows come from vmapped VJPs instead, so
    the cost is ``min(m, n)`` passes.

    Returns:
        ``J`` of shape ``(B, m, n)`` (differentiable under autograd).
    """
    B, n = z.shape
    if n <= m:
        basis = torch.eye(n, dtype=z.dtype, device=z.device).unsqueeze(1).expand(n, B, n)
        cols = _vmap_or_loop(lambda v: torch.func.jvp(fn, (z,), (v,))[1], basis)  # (n, B, m)
        return cols.permute(1, 2, 0)
    pull = torch.func.vjp(fn, z)[1]
    basis = torch.eye(m, dtype=z.dtype, device=z.device).unsqueeze(1).expand(m, B, m)
    rows = _vmap_or_loop(lambda u: pull(u)[0], basis)  # (m, B, n)
    return rows.permute(1, 0, 2)


def merit(F: Fn) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``w -> (½‖F(w)‖², F(w))``: the merit of the root and least-squares line searches."""
    def evaluate(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Fw = F(w)
        return 0.5 * (Fw * Fw).sum(-1), Fw
    return evaluate


def batched_value_and_grad(f: Fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``f(z)`` of shape ``(B,)`` and per-element gradients ``∇f(z)_b`` of shape ``(B, n)``.

    The problems are independent, so the gradient of ``sum_b f_b`` is every element's gradient.
    """
    fz, pull = torch.func.vjp(f, z)[:2]
    check_output(fz, (z.shape[0],), "the objective f")
    (g,) = pull(torch.ones_like(fz))
    return fz, g


def solve_or_pinv(A: torch.Tensor, b: torch.Tensor, sync: bool = True) -> torch.Tensor:
    """Solve ``A_b x_b = b_b`` for a batch ``A (B, n, n)``, ``b (B, n)`` or ``(B, n, k)``.

    LU (``torch.linalg.solve_ex``) first; where it fails (singular pivot or non-finite
    answer) the minimum-norm least-squares solution ``pinv(A_b) b_b`` is used instead.
    Elements with non-finite data get a NaN answer and never disturb the others.
    """
    vec = b.dim() == 2
    rhs = b.unsqueeze(-1) if vec else b
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    finite = torch.isfinite(A).all(dim=(-2, -1)) & torch.isfinite(rhs).all(dim=(-2, -1))
    A, rhs = masked(finite, A, eye), masked(finite, rhs, torch.zeros_like(rhs))
    x, info = torch.linalg.solve_ex(A, rhs)
    bad = (info != 0) | ~torch.isfinite(x).all(dim=(-2, -1))
    if not sync or bool(bad.any()):
        x = masked(bad, torch.linalg.pinv(masked(bad, A, eye)) @ rhs, x)
    x = masked(finite, x, torch.full_like(x, float("nan")))
    return x.squeeze(-1) if vec else x


class Step(NamedTuple):
    """Outcome of :func:`line_search` (all ``(B,)`` or ``(B, n)``)."""

    t: torch.Tensor  # accepted step (0 where none)
    z: torch.Tensor  # accepted point (z where none)
    values: tuple[torch.Tensor, ...]  # evaluate() there
    ok: torch.Tensor  # bool: a step was accepted
    t_retry: torch.Tensor  # where not ok: the next trial step to try (next iteration)


def line_search(evaluate: Callable[[torch.Tensor], Sequence[torch.Tensor]], z: torch.Tensor,
                d: torch.Tensor, phi0: torch.Tensor, slope: torch.Tensor,
                current: Sequence[torch.Tensor], active: torch.Tensor, *,
                t0: torch.Tensor | float = 1.0, wolfe: bool = False, has_grad: bool = False,
                sync: bool = True) -> Step:
    r"""Per-element backtracking (Armijo) or weak-Wolfe bisection line search.

    Seeks ``t_b`` with the sufficient decrease (Armijo) condition
    ``φ(z + t d) <= φ(z) + c₁ t φ'(0) + 10ε|φ(z)|``, ``c₁ = 1e-4`` (the slack absorbs
    round-off). Where ``φ`` cannot resolve the decrease (``t|φ'(0)| <= 1000ε|φ(z)|``) and
    ``has_grad`` (``evaluate`` returns the gradient second), the approximate Armijo condition
    of Hager & Zhang (2005) is used instead: ``φ(z + t d) <= φ(z) + 10ε|φ(z)|`` and
    ``∇φ(z + t d)·d <= (2c₁ - 1) φ'(0)``. With ``wolfe=True`` (needs the gradient) the weak
    curvature condition ``∇φ(z + t d)·d >= c₂ φ'(0)`` (``c₂ = 0.9``) is also sought by
    bisection/expansion (Lewis & Overton 2013), an Armijo point being kept if it is not met;
    otherwise a rejected step is replaced by the minimiser of the quadratic interpolant,
    safeguarded to ``[t/10, t/2]``. At most 30 trials; with ``sync=False`` a single trial
    (no host synchronisation): the caller retries from ``t_retry`` at the next iteration.

    Args:
        evaluate: ``w (B, n) -> (φ(w) (B,), *extras)``; extras are batch-first tensors.
        z, d: Point and direction ``(B, n)``.
        phi0, slope: ``φ(z)`` and ``φ'(0) = ∇φ(z)·d`` (``(B,)``, negative for descent).
        current: ``evaluate(z)``, returned where no step is accepted.
        active: ``(B,)`` elements to search for.
        t0: First trial step, float or ``(B,)``.

    Returns:
        A :class:`Step`.
    """
    t = torch.as_tensor(t0, dtype=z.dtype, device=z.device).expand(z.shape[0]).clone()
    lo, hi = torch.zeros_like(t), torch.full_like(t, float("inf"))
    slack = 10 * torch.finfo(z.dtype).eps * phi0.abs()
    searching, ok = active.clone(), torch.zeros_like(active)
    t_acc, z_acc, vals_acc = torch.zeros_like(t), z, tuple(current)
    for _ in range(MAX_TRIALS if sync else 1):
        z_try = z + t.unsqueeze(-1) * d
        vals = tuple(evaluate(z_try))
        phi, finite = vals[0], torch.isfinite(vals[0])
        armijo = finite & (phi <= phi0 + ARMIJO_C1 * t * slope + slack)
        if has_grad or wolfe:
            dphi = (vals[1] * d).sum(-1)
            approx = finite & (phi <= phi0 + slack) & (dphi <= (2 * ARMIJO_C1 - 1) * slope)
            armijo = torch.where(t * slope.abs() <= 100 * slack, approx, armijo)
        good = armijo & (dphi >= WOLFE_C2 * slope) if wolfe else armijo
        upd = searching & armijo
        t_acc, z_acc = torch.where(upd, t, t_acc), masked(upd, z_try, z_acc)
        vals_acc = tuple(masked(upd, v, a) for v, a in zip(vals, vals_acc, strict=True))
        ok = ok | upd
        searching = searching & ~good
        if wolfe:
            hi = torch.where(searching & ~armijo, t, hi)
            lo = torch.where(searching & armijo, t, lo)
            t_next = torch.where(torch.isinf(hi), 2 * t, (lo + hi) / 2)
        else:  # minimiser of the quadratic interpolating φ(0), φ'(0), φ(t), kept in [t/10, t/2]
            curv = torch.where(finite, phi - phi0 - slope * t, torch.full_like(t, float("inf")))
            t_q = -slope * t * t / (2 * curv).clamp_min(torch.finfo(t.dtype).tiny)
            t_next = torch.minimum(torch.maximum(t_q, t / 10), t / 2)
        t = torch.where(searching, t_next, t)
        if sync and not bool(searching.any()):
            break
    return Step(t_acc, z_acc, vals_acc, ok, t)

"""Shared pieces of the generic iterative solvers (root, fixed point, minimize, least squares).

Every generic solver works on a batch of independent problems stored flat: iterates ``z`` of
shape ``(B, n)``, with per-element convergence (a converged element is frozen while the others
continue). Solvers are frozen dataclasses with a ``run_*`` method returning a flat
:class:`~optlayers.Result` (``solution`` of shape ``(B, n)``, flags of shape ``(B,)``).

Iterations are written with out-of-place tensor operations and masks (``torch.where``), so the
same code is differentiable when run under autograd (used by ``UnrollAdjoint``).

Stopping test (all solvers): element ``b`` has converged when
``residual_b <= atol + rtol * residual_b(z0)``; ``None`` tolerances default by dtype
(float64: ``rtol=1e-10``, ``atol=1e-12``; float32 and lower: ``rtol=1e-5``, ``atol=1e-7``).
With ``check_every=k`` the loop synchronises with the host every ``k`` iterations to stop once
no element is active; with ``check_every=None`` the test is switched off and exactly
``max_iter`` iterations run without host synchronisation (``torch.compile``, CUDA graphs), the
flags being computed at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from ..._result import Result, Status, status_from

__all__ = [
    "Callback", "IterativeSolver", "Tracker", "default_tol", "masked", "batched_jacobian",
    "batched_value_and_grad", "solve_or_pinv", "line_search", "Step", "check_iterate", "check_output", "Fn",
    "merit",
]

Callback = Callable[[int, torch.Tensor], None]
Fn = Callable[[torch.Tensor], torch.Tensor]

ARMIJO_C1 = 1e-4
WOLFE_C2 = 0.9
MAX_TRIALS = 30


def default_tol(dtype: torch.dtype, value: float | None, f64: float, f32: float) -> float:
    """Resolve a tolerance that defaults by dtype (``None`` -> ``f64`` or ``f32``)."""
    if value is not None:
        return value
    return f64 if dtype == torch.float64 else f32


def masked(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where`` with a ``(B,)`` mask broadcast over the trailing dims of ``new``."""
    return torch.where(mask.reshape(mask.shape + (1,) * (new.dim() - 1)), new, old)


def check_iterate(z0: torch.Tensor, name: str = "z0") -> torch.Tensor:
    """Validate a flat batched iterate: a floating tensor of shape ``(B, n)``."""
    if not isinstance(z0, torch.Tensor) or z0.dim() != 2 or not z0.is_floating_point():
        shape = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
        raise ValueError(f"{name} must be a floating tensor of shape (B, n), got {shape}")
    return z0


def check_output(out: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tuple(out.shape) != shape:
        raise ValueError(f"{what} must return shape {shape}, got {tuple(out.shape)}")
    return out


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
    _, pull = torch.func.vjp(fn, z)
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
    fz, pull = torch.func.vjp(f, z)
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


class Tracker:
    """Per-element convergence bookkeeping shared by every generic solver.

    Holds the active mask, iteration counts, the residual of the current iterate, the
    tolerance ``atol + rtol * residual(z0)`` and early-stop flags (NONFINITE, STAGNATION).
    Iterate over it for the loop indices; call :meth:`advance` once per iteration and
    :meth:`finish` at the end.
    """

    def __init__(self, residual: torch.Tensor, *, rtol: float, atol: float, max_iter: int,
                 check_every: int | None, callback: Callback | None,
                 nonfinite: torch.Tensor | None = None, solved: torch.Tensor | None = None):
        res = residual.detach()
        finite = torch.isfinite(res)
        if nonfinite is not None:
            finite = finite & ~nonfinite
        self.tol = atol + rtol * torch.where(finite, res, torch.zeros_like(res))
        self.max_iter, self.check_every, self.callback = max_iter, check_every, callback
        self.sync = check_every is not None
        self.residual = res
        self.solved = torch.zeros_like(finite) if solved is None else solved.detach()
        self.flag = torch.where(finite, 0, int(Status.NONFINITE)).to(torch.int64)
        self.iterations = torch.zeros(res.shape, dtype=torch.int64, device=res.device)
        self.active = finite & ~self._done() if self.sync else finite
        self.k = 0

    def _done(self) -> torch.Tensor:
        return (self.residual <= self.tol) | self.solved

    def __iter__(self) -> Iterator[int]:
        for k in range(self.max_iter):
            if self.sync and k % self.check_every == 0 and not bool(self.active.any()):
                return
            yield k

    def advance(self, residual: torch.Tensor, *, nonfinite: torch.Tensor | None = None,
                stalled: torch.Tensor | None = None, solved: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Record one iteration; returns the ``(B,)`` mask of elements taking their new iterate.

        Active elements with a non-finite new residual (or ``nonfinite``) stop with NONFINITE
        and keep their last finite iterate; ``stalled`` ones keep theirs too and are flagged
        STAGNATION (and stop, unless ``check_every=None``: then only NONFINITE stops one).
        """
        act, res = self.active, residual.detach()
        bad = ~torch.isfinite(res) if nonfinite is None else ~torch.isfinite(res) | nonfinite
        stall = torch.zeros_like(bad) if stalled is None else stalled & ~bad
        take = act & ~bad & ~stall
        self.iterations = self.iterations + act.to(torch.int64)
        self.residual = torch.where(take, res, self.residual)
        if solved is not None:
            self.solved = torch.where(take, solved.detach(), self.solved)
        self.flag = torch.where(act & bad, int(Status.NONFINITE), self.flag)
        self.flag = torch.where(act & stall, int(Status.STAGNATION), self.flag)
        self.active = act & ~bad & ~stall & ~self._done() if self.sync else act & ~bad
        self.k += 1
        if self.callback is not None:
            self.callback(self.k, self.residual)
        return take

    def finish(self, z: torch.Tensor) -> Result:
        """The flat :class:`Result` for the final iterate ``z``."""
        res = self.residual
        converged = torch.isfinite(res) & self._done() & (self.flag != int(Status.NONFINITE))
        return Result(solution=z, converged=converged, iterations=self.iterations,
                      residual=res, status=status_from(converged, res, extra=self.flag))


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeSolver:
    """Fields and validation common to the generic solvers.

    Attributes:
        rtol: Relative tolerance on the residual (``None``: 1e-10 in float64, 1e-5 in float32).
        atol: Absolute tolerance (``None``: 1e-12 in float64, 1e-7 in float32).
        max_iter: Iteration limit (reaching it gives ``Status.MAX_ITER``).
        check_every: Host synchronisation period of the stopping test; ``None`` runs exactly
            ``max_iter`` iterations with no synchronisation.
    """

    rtol: float | None = None
    atol: float | None = None
    max_iter: int = 100
    check_every: int | None = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("rtol", "atol"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0 or value == float("inf")):
                raise ValueError(f"{name}: {field} must be a finite float >= 0 or None, got {value!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"{name}: max_iter must be an int >= 1, got {self.max_iter!r}")
        ce = self.check_every
        if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
            raise ValueError(f"{name}: check_every must be an int >= 1 or None, got {ce!r}")

    def _positive(self, field: str, *, allow_none: bool = False, upper: float | None = None) -> None:
        """Validate that float field ``field`` is finite and > 0 (and <= ``upper``)."""
        value = getattr(self, field)
        if value is None and allow_none:
            return
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                or value == float("inf") or (upper is not None and value > upper)):
            bound = "" if upper is None else f" and <= {upper}"
            raise ValueError(f"{type(self).__name__}: {field} must be a float > 0{bound}, got {value!r}")

    def _tracker(self, residual: torch.Tensor, dtype: torch.dtype, callback: Callback | None, *,
                 nonfinite: torch.Tensor | None = None, solved: torch.Tensor | None = None,
                 ) -> Tracker:
        rtol = default_tol(dtype, self.rtol, 1e-10, 1e-5)
        atol = default_tol(dtype, self.atol, 1e-12, 1e-7)
        return Tracker(residual, rtol=rtol, atol=atol, max_iter=self.max_iter,
                       check_every=self.check_every, callback=callback, nonfinite=nonfinite,
                       solved=solved)

    def _atol(self, dtype: torch.dtype) -> float:
        return default_tol(dtype, self.atol, 1e-12, 1e-7)

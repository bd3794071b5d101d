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
import math
from collections.abc import Callable, Iterator

import torch

from ..._result import Result, Status, status_from

__all__ = ["Callback", "Fn", "IterativeSolver", "Tracker", "check_iterate", "check_output", "default_tol", "masked"]

Callback = Callable[[int, torch.Tensor], None]
Fn = Callable[[torch.Tensor], torch.Tensor]

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
    """Validate the output shape of a user function (a ValueError naming ``what``)."""
    if tuple(out.shape) != shape:
        raise ValueError(f"{what} must return shape {shape}, got {tuple(out.shape)}")
    return out


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
        every = self.check_every
        for k in range(self.max_iter):
            if every is not None and k % every == 0 and not bool(self.active.any()):
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
        self._check("rtol", float, low=0.0, allow_none=True)
        self._check("atol", float, low=0.0, allow_none=True)
        self._check("max_iter", int, low=1)
        self._check("check_every", int, low=1, allow_none=True)

    def _check(self, field: str, kind: type, *, low: float | None = None, strict: bool = False,
               upper: float | None = None, allow_none: bool = False) -> None:
        """Raise a ValueError naming ``field`` unless it is a finite ``kind`` within the bounds."""
        value = getattr(self, field)
        if value is None and allow_none:
            return
        if kind is bool:
            ok, desc = isinstance(value, bool), "a bool"
        else:
            number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            ok = number and math.isfinite(value) and (low is None or (value > low if strict else value >= low)) \
                and (upper is None or value <= upper)
            desc = f"{'an int' if kind is int else 'a finite float'}" + ("" if low is None else
                                                                     f" {'>' if strict else '>='} {low}")
            desc += ("" if upper is None else f" and <= {upper}") + (" or None" if allow_none else "")
        if not ok:
            raise ValueError(f"{type(self).__name__}: {field} must be {desc}, got {value!r}")

    def _tracker(self, residual: torch.Tensor, dtype: torch.dtype, callback: Callback | None, *,
                 nonfinite: torch.Tensor | None = None, solved: torch.Tensor | None = None) -> Tracker:
        rtol, atol = self.tolerances(dtype)
        return Tracker(residual, rtol=rtol, atol=atol, max_iter=self.max_iter, check_every=self.check_every,
                       callback=callback, nonfinite=nonfinite, solved=solved)

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` resolved for ``dtype``."""
        return default_tol(dtype, self.rtol, 1e-10, 1e-5), default_tol(dtype, self.atol, 1e-12, 1e-7)

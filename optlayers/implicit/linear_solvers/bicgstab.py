"""BiCGStab for batches of general (nonsymmetric) systems."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result, Status
from ._base import (
    KrylovSolver,
    LinearOperator,
    Monitor,
    confirm,
    default_max_iter,
    dot,
    prepare,
)

__all__ = ["BiCGStab"]

_State = dict[str, torch.Tensor]


def _init(r: torch.Tensor) -> _State:
    one = torch.ones(r.shape[:-1], dtype=r.dtype, device=r.device)
    zeros = torch.zeros_like(r)
    return {"r": r, "rhat": r, "rho": one, "alpha": one, "omega": one, "v": zeros, "p": zeros,
            "fresh": torch.ones_like(one, dtype=torch.bool)}


def _merge(mask: torch.Tensor, new: _State, old: _State) -> _State:
    return {key: torch.where(mask.unsqueeze(-1) if val.dim() == 2 else mask, val, old[key])
            for key, val in new.items()}


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiCGStab(KrylovSolver):
    r"""BiCGStab (van der Vorst) for general square ``A``; needs no transpose.

    Combines the BiCG recurrences (shadow residual ``r̂ = r_0``) with a local residual
    minimization step; each iteration costs two matvecs:

    .. math::
        ρ_k = r̂ᵀ r_k,\ p = r_k + \frac{ρ_k α}{ρ_{k-1} ω}(p − ω v),\ v = A p,\
        α = \frac{ρ_k}{r̂ᵀ v},\ s = r_k − α v,\ t = A s,\ ω = \frac{tᵀ s}{tᵀ t},

    then ``x ← x + α p + ω s`` and ``r ← s − ω t``. The true residual is checked when the
    recurrence claims convergence, and the iteration restarts from ``x`` if they differ.

    Breakdowns: ``|ρ| ≤ ε ‖r̂‖ ‖r‖`` or ``|r̂ᵀ v| ≤ ε ‖r̂‖ ‖v‖`` (BiCG breakdown) restart the
    element from the true residual with a fresh shadow ``r̂ = r``, and so does ``ω ≈ 0``
    (``|tᵀ s| ≤ ε ‖t‖ ‖s‖``, after keeping the BiCG half step); a breakdown in the very first
    step after a (re)start is genuine and stops the element with ``BREAKDOWN``. An element
    that stops unconverged returns its best iterate. No 1% improvement
    of the best residual during ``max(50, min(2n, 1000))`` iterations gives ``STAGNATION``.

    Args:
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance.
        max_iter: Iteration limit; None means ``max(10 n, 50)``.
        ridge: Tikhonov shift added to ``A``.
        callback: Called after every iteration with ``(k, ‖r‖)``, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import BiCGStab, LinearOperator
        >>> A = torch.tensor([[[2.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
        >>> b = torch.ones(1, 2, dtype=torch.float64)
        >>> result = BiCGStab()(LinearOperator.from_dense(A), b)
        >>> bool(result.converged.all()), torch.allclose(result.solution, torch.linalg.solve(A, b))
        (True, True)

    References:
        van der Vorst, "Bi-CGSTAB: a fast and smoothly converging variant of Bi-CG for the
        solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput., 1992.
    """

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol, atol=self.atol)
        A, b, x, tol = prep.op, prep.b, prep.x, prep.tol
        max_iter = default_max_iter(A.n, self.max_iter)
        eps = torch.finfo(b.dtype).eps

        st = _init(b - A.matvec(x))
        rnorm = _norm(st["r"])
        active = ~prep.done & ~(rnorm <= tol)
        mon = Monitor(rnorm, A.n, x)
        one = torch.ones_like(rnorm)
        k = 0
        while k < max_iter and bool(active.any()):
            r, rhat = st["r"], st["rhat"]
            rho = dot(rhat, r)
            bad = active & ~(rho.abs() > eps * _norm(rhat) * _norm(r))
            beta = (rho / torch.where(active, st["rho"], one)) \
                * (st["alpha"] / torch.where(active, st["omega"], one))
            p = r + beta.unsqueeze(-1) * (st["p"] - st["omega"].unsqueeze(-1) * st["v"])
            v = A.matvec(p)
            den = dot(rhat, v)
            bad = bad | (active & ~(den.abs() > eps * _norm(rhat) * _norm(v)))
            # A near-breakdown right after a (re)start is genuine; later ones restart with a
            # fresh shadow residual r̂ = r.
            genuine = mon.fail(bad & st["fresh"], Status.BREAKDOWN)
            active = active & ~genuine
            soft = bad & ~genuine
            go = active & ~soft
            alpha = rho / torch.where(go, den, one)
            s = r - alpha.unsqueeze(-1) * v
            snorm = _norm(s)
            half = go & (snorm <= tol)
            t = A.matvec(s)
            ts, tt = dot(t, s), dot(t, t)
            tiny_omega = go & ~half & ~(ts.abs() > eps * tt.sqrt() * snorm)  # ω ≈ 0: restart
            full = go & ~half & ~tiny_omega
            omega = torch.where(full, ts / torch.where(full, tt, one), one)
            x_half = x + alpha.unsqueeze(-1) * p
            x = torch.where(full.unsqueeze(-1), x_half + omega.unsqueeze(-1) * s,
                            torch.where((half | tiny_omega).unsqueeze(-1), x_half, x))
            r_new = torch.where(full.unsqueeze(-1), s - omega.unsqueeze(-1) * t, s)
            new = {"r": r_new, "rhat": rhat, "rho": rho, "alpha": alpha, "omega": omega,
                   "v": v, "p": p, "fresh": torch.zeros_like(go)}
            st = _merge(go, new, st)
            rnorm = torch.where(go, _norm(st["r"]), rnorm)
            mon.count_step(active)
            k += 1

            check = (go & (rnorm <= tol)) | soft | tiny_omega
            checked = confirm(A, b, x, check, tol)
            if checked is not None:  # confirm with the true residual, or restart from it
                ok, r_true, tnorm = checked
                active = active & ~ok
                restart = check & ~ok
                st = _merge(restart, _init(r_true), st)
                rnorm = torch.where(restart, tnorm, rnorm)
            active = mon.track(rnorm, active, x)
            if self.callback is not None:
                self.callback(k, rnorm)
        return mon.result(prep, x, active)

"""MINRES for batches of symmetric (possibly indefinite) systems."""

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

__all__ = ["MINRES"]

_State = dict[str, torch.Tensor]


def _init(r: torch.Tensor) -> _State:
    """Lanczos/QR state of a fresh start from the residual ``r``."""
    beta = torch.linalg.vector_norm(r, dim=-1)
    zero, zeros = torch.zeros_like(beta), torch.zeros_like(r)
    return {"r1": r, "r2": r, "oldb": zero, "beta": beta, "dbar": zero, "epsln": zero,
            "phibar": beta, "cs": -torch.ones_like(beta), "sn": zero, "w": zeros, "w2": zeros,
            "first": torch.ones_like(beta, dtype=torch.bool)}


def _merge(mask: torch.Tensor, new: _State, old: _State) -> _State:
    out = {}
    for key, value in new.items():
        m = mask.unsqueeze(-1) if value.dim() == 2 else mask
        out[key] = torch.where(m, value, old[key])
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class MINRES(KrylovSolver):
    r"""MINRES (Paige–Saunders) for symmetric, possibly indefinite ``A``.

    Minimizes the residual norm over the Krylov spaces built by the Lanczos process,

    .. math::
        x_k = \arg\min_{x ∈ x_0 + \mathcal K_k(A, r_0)} ‖(A + ridge I) x − b‖_2,

    updating a QR factorization of the tridiagonal Lanczos matrix with Givens rotations, so
    each iteration costs one matvec and O(n) work. The residual estimate ``φ̄_k`` decreases
    monotonically; the true residual is checked when it claims convergence (and the
    iteration restarts from ``x`` if round-off made them differ).

    When the Lanczos process finds an invariant subspace (``β_{k+1} ≤ √ε ‖T‖``) the iteration
    restarts from the true residual; if the last pivot is tiny as well (``γ_k ≤ √ε ‖T‖`` or
    ``γ_k < 2 β_{k+1}``: ``T_k`` is numerically singular) that step is skipped first.

    Failures, never silent: the least-squares residual reached (``‖A r‖ ≤ n ε ‖T‖ ‖r‖``
    estimated by ``hypot(γ̄, δ̄)``), a pivot ``γ ≤ n ε ‖T‖``, an estimated condition number
    ``γ_max / γ_min ≥ 0.1 / ε``, or a singular pivot right after a restart stop the element
    with ``SINGULAR`` (``b`` has a component outside the range of a singular ``A``); no 1%
    improvement during ``max(50, min(2n, 1000))`` iterations gives ``STAGNATION``. ``A`` is
    assumed symmetric (the tag is not checked).

    Args:
        rtol: Relative tolerance; None means 1e-12 in float64 and 1e-6 in float32.
        atol: Absolute tolerance.
        max_iter: Iteration limit; None means ``max(10 n, 50)``.
        ridge: Tikhonov shift added to ``A``.
        callback: Called after every iteration with ``(k, φ̄)``, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from optlayers.implicit.linear_solvers import MINRES, LinearOperator
        >>> A = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64)).expand(1, 2, 2)
        >>> op = LinearOperator.from_dense(A, symmetric=True)
        >>> MINRES()(op, torch.ones(1, 2, dtype=torch.float64)).solution
        tensor([[ 0.5000, -1.0000]], dtype=torch.float64)

    References:
        Paige & Saunders, "Solution of sparse indefinite systems of linear equations", 1975.
    """

    def __call__(self, op: LinearOperator, b: torch.Tensor,
                 x0: torch.Tensor | None = None) -> Result:
        """Solve ``(A + ridge I) x = b``; see the class docstring."""
        prep = prepare(op, b, x0, ridge=self.ridge, rtol=self.rtol, atol=self.atol)
        A, b, x, tol = prep.op, prep.b, prep.x, prep.tol
        n = A.n
        max_iter = default_max_iter(n, self.max_iter)
        eps = torch.finfo(b.dtype).eps
        sqrt_eps = eps**0.5

        st = _init(b - A.matvec(x))
        rnorm = st["beta"]
        active = ~prep.done & ~(rnorm <= tol)
        mon = Monitor(rnorm, n)
        tnorm2 = torch.zeros_like(rnorm)
        gmax, gmin = torch.zeros_like(rnorm), torch.full_like(rnorm, float("inf"))
        one = torch.ones_like(rnorm)
        k = 0
        while k < max_iter and bool(active.any()):
            beta_old = st["beta"]
            v = st["r2"] / torch.where(active, beta_old, one).unsqueeze(-1)
            y = A.matvec(v)
            coef = torch.where(st["first"] | ~active, torch.zeros_like(one),
                               beta_old / torch.where(active & ~st["first"], st["oldb"], one))
            y = y - coef.unsqueeze(-1) * st["r1"]
            alfa = dot(v, y)
            y = y - (alfa / torch.where(active, beta_old, one)).unsqueeze(-1) * st["r2"]
            beta = torch.linalg.vector_norm(y, dim=-1)
            tnorm2 = torch.where(active, tnorm2 + alfa.square() + beta_old.square() + beta.square(),
                                 tnorm2)
            cs, sn, dbar = st["cs"], st["sn"], st["dbar"]
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar_new = -cs * beta
            gamma = torch.hypot(gbar, beta)
            anorm = tnorm2.sqrt()
            gmax = torch.where(active, torch.maximum(gmax, gamma), gmax)
            gmin = torch.where(active, torch.minimum(gmin, gamma), gmin)
            # Invariant Krylov space (β ≈ 0): the step is sound only if the last pivot is not
            # tiny too (then T_k is singular: skip the step); afterwards restart from the true
            # residual.
            exhausted = active & (beta <= sqrt_eps * anorm)
            singular = active & ~((gamma > n * eps * anorm) & (gmax < 0.1 / eps * gmin))  # also NaN
            noisy = exhausted & ((beta > 0.5 * gamma) | (gamma <= sqrt_eps * anorm))  # T_k singular
            singular = singular | (noisy & st["first"])  # ... unless just restarted
            active = active & ~mon.fail(singular, Status.SINGULAR)
            go = active & ~noisy
            gamma = torch.where(go, gamma, one)
            cs_new, sn_new = gbar / gamma, beta / gamma
            phi = cs_new * st["phibar"]
            phibar = sn_new * st["phibar"]
            w = (v - st["epsln"].unsqueeze(-1) * st["w2"] - delta.unsqueeze(-1) * st["w"]) \
                / gamma.unsqueeze(-1)
            step = go.unsqueeze(-1)
            x = torch.where(step, x + phi.unsqueeze(-1) * w, x)
            new = {"r1": st["r2"], "r2": y, "oldb": beta_old, "beta": beta, "dbar": dbar_new,
                   "epsln": epsln, "phibar": phibar, "cs": cs_new, "sn": sn_new, "w": w,
                   "w2": st["w"], "first": torch.zeros_like(active)}
            st = _merge(go, new, st)
            rnorm = torch.where(go, phibar, rnorm)
            # ‖A r‖ / ‖r‖ ≈ hypot(γ̄, δ̄): r has (numerically) reached the null space of A,
            # i.e. x solves the least-squares problem but b is not in the range.
            lsq = go & (torch.hypot(gbar, dbar_new) <= n * eps * anorm) & ~(rnorm <= tol)
            mon.count_step(active)
            k += 1

            claimed = go & (rnorm <= tol)
            exhausted = exhausted & active
            checked = confirm(A, b, x, claimed | exhausted, tol)
            if checked is not None:  # confirm with the true residual, or restart from it
                ok, r_true, tnorm = checked
                active = active & ~ok
                restart = (claimed | (exhausted & ~lsq)) & ~ok
                st = _merge(restart, _init(r_true), st)
                rnorm = torch.where(restart, tnorm, rnorm)
            lsq = lsq & active
            active = active & ~mon.fail(lsq, Status.SINGULAR)
            active = mon.track(rnorm, active)
            if self.callback is not None:
                self.callback(k, rnorm)
        return mon.result(prep, x, active)

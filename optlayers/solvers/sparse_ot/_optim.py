"""Batched first-order solvers of the (semi-)dual: L-BFGS and fixed-iteration Adam.

Both minimise ``f(z) = −D(z)`` through an *oracle* ``z (B, d) -> (f (B,), ∇f (B, d),
violation (B,), binding (B,))`` that evaluates value and gradient in closed form (no autograd:
the gradient of the dual is the marginal residual of the plan, by Danskin's theorem).

Line search (:func:`convex_line_search`): ``f`` is convex, so ``f(z + t d) <= f(z) + t ∇f(z + t d)·d``
and a step whose directional derivative is still ``<= c₁ ∇f(z)·d`` satisfies the Armijo condition
without comparing function values — which near the optimum differ by less than their round-off
(a sum over ``m k`` plan entries). Weak-Wolfe steps are found by expansion/bisection on the
derivative alone (Lewis & Overton 2013), with the usual value test as a second way to accept.

Stopping test, per problem: the L1 marginal violation ``‖∇f‖₁ <= tol``; or, where the
cardinality constraint binds (the plan of some column has ``k`` nonzeros), the dual has stopped
improving — ``f`` decreased by at most ``ftol · max(|f|, scale)`` over the last ``window``
iterations while the violation did not halve, or the line search cannot decrease it any more.
The second test exists because a binding ``k`` makes the (semi-)dual nonsmooth at its maximum
(ties between the ``k``-th and ``(k+1)``-th entries of a column), where the gradient — the
marginal violation — need not vanish: that violation is the duality gap of the nonconvex primal,
reported by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..._result import Result, Status, status_from
from ...implicit.solvers._base import Tracker, masked
from ...implicit.solvers.lbfgs import _two_loop

__all__ = ["DualLBFGS", "DualAdam", "Oracle", "run_lbfgs", "run_adam", "convex_line_search"]

ARMIJO_C1 = 1e-4
WOLFE_C2 = 0.9
MAX_TRIALS = 30

Oracle = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
Callback = Callable[[int, torch.Tensor], None]


def _check_int(obj: object, name: str, low: int, allow_none: bool = False) -> None:
    v = getattr(obj, name)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{type(obj).__name__}: {name} must be an int >= {low}{extra}, got {v!r}")


def _check_pos(obj: object, name: str, allow_none: bool = False, upper: float | None = None) -> None:
    v = getattr(obj, name)
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (upper is None or v < upper)
    if not ok:
        bound = f" and < {upper}" if upper is not None else ""
        raise ValueError(f"{type(obj).__name__}: {name} must be a float > 0{bound}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DualLBFGS:
    r"""L-BFGS on the (semi-)dual, with a weak-Wolfe line search (the default solver).

    Minimises :math:`f = -D` (the negated concave (semi-)dual) by

    .. math::

        z_{t+1} = z_t + s_t d_t, \qquad d_t = -H_t \nabla f(z_t),

    with :math:`H_t` the L-BFGS inverse-Hessian approximation built from the last ``memory`` pairs
    :math:`(z_{i+1} - z_i,\ \nabla f(z_{i+1}) - \nabla f(z_i))`, and a step :math:`s_t` meeting the
    weak Wolfe conditions :math:`\nabla f(z_t + s_t d_t)^\top d_t \le c_1 \nabla f(z_t)^\top d_t`
    (sufficient decrease, for convex :math:`f`) and :math:`\nabla f(z_t + s_t d_t)^\top d_t \ge c_2
    \nabla f(z_t)^\top d_t`, :math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9` (see the module docstring).

    On CPU (float32/float64, at least 4,096 cost entries, no ``callback``, synchronised mode) the
    whole solve runs as one compiled Numba call (kernel ``"sparse_ot_dual_lbfgs"``: the same
    iteration and tests, in float64, with the value and gradient fused into one pass over the
    cost); elsewhere this module's PyTorch loop runs it.

    Args:
        memory: Stored curvature pairs.
        max_iter: Iteration limit (reaching it gives ``MAX_ITER``); for the dual formulation it
            applies to the semi-dual warm start and to the dual stage each.
        check_every: Host-sync period of the stopping test; None runs exactly ``max_iter``
            iterations with no synchronisation (one line-search trial per iteration, fixed kernel
            width ``k``).
        ftol: Relative dual-improvement threshold of the stall test used where ``k`` binds
            (None: ``1e-8`` in float64, ``1e-5`` in float32).
        window: Iterations over which that improvement is measured.

    Example:
        Quadratically regularized OT (``k=None``) with a shorter memory; its marginals are met to
        the default tolerance:

        >>> import torch
        >>> from optlayers.solvers.sparse_ot import DualLBFGS, sparse_ot
        >>> C = torch.rand(5, 4, dtype=torch.float64)
        >>> res = sparse_ot(None, None, C, k=None, gamma=0.1, solver=DualLBFGS(memory=5, max_iter=500))
        >>> bool(res.converged), bool(res.aux.marginal_violation < 1e-8)
        (True, True)
    """

    memory: int = 10
    max_iter: int = 2000
    check_every: int | None = 1
    ftol: float | None = None
    window: int = 10

    def __post_init__(self) -> None:
        _check_int(self, "memory", 1)
        _check_int(self, "max_iter", 1)
        _check_int(self, "check_every", 1, allow_none=True)
        _check_pos(self, "ftol", allow_none=True)
        _check_int(self, "window", 1)


@dataclasses.dataclass(frozen=True)
class DualAdam:
    r"""Fixed-iteration Adam ascent on the (semi-)dual: no host synchronisation.

    Runs exactly ``max_iter`` steps (for ``torch.compile``/CUDA graphs and cheap inner loops,
    e.g. routing). Flags are computed at the end: converged where the marginal violation is at
    most ``tol``. With :math:`g_t = \nabla f(z_t)`, :math:`f = -D`, each step is

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        z_{t+1} = z_t - \eta \max|C|\, \frac{m_t / (1 - \beta_1^t)}
        {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon \textstyle\sum_i a_i},

    where :math:`\eta` is ``lr`` and :math:`\epsilon` is ``eps``.

    Args:
        lr: Step size, *relative to the cost scale* ``max |C|`` of each problem.
        max_iter: Number of steps.
        betas: Adam's moment decay rates.
        eps: Adam's denominator guard, relative to the marginal scale.

    Example:
        Exactly ``max_iter`` steps; on this small problem they reach the L-BFGS plan:

        >>> import torch
        >>> from optlayers.solvers.sparse_ot import DualAdam, sparse_ot
        >>> C = torch.rand(5, 4, dtype=torch.float64)
        >>> res = sparse_ot(None, None, C, k=None, gamma=0.1, solver=DualAdam(max_iter=500), throw=False)
        >>> ref = sparse_ot(None, None, C, k=None, gamma=0.1)
        >>> int(res.iterations), torch.allclose(res.aux.plan.to_dense(), ref.aux.plan.to_dense(), atol=1e-6)
        (500, True)
    """

    lr: float = 0.02
    max_iter: int = 300
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_pos(self, "lr")
        _check_int(self, "max_iter", 1)
        _check_pos(self, "eps")
        b = self.betas
        if not (isinstance(b, tuple) and len(b) == 2 and all(isinstance(x, float) and 0 <= x < 1 for x in b)):
            raise ValueError(f"DualAdam: betas must be a pair of floats in [0, 1), got {b!r}")


def convex_line_search(oracle: Oracle, z: torch.Tensor, d: torch.Tensor, current: tuple[torch.Tensor, ...],
                       slope: torch.Tensor, active: torch.Tensor, t0: torch.Tensor, sync: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Weak-Wolfe search along ``d`` for a convex ``f`` (see the module docstring).

    Returns:
        ``(t, z_new, oracle(z_new), ok, t_retry)``; where no step was accepted, ``z_new = z``,
        the values are ``current`` and ``t_retry`` is the next trial step.
    """
    f0 = current[0]
    t = t0.clone()
    lo, hi = torch.zeros_like(t), torch.full_like(t, float("inf"))
    searching, ok = active.clone(), torch.zeros_like(active)
    t_acc, z_acc, vals_acc = torch.zeros_like(t), z, tuple(current)
    for _ in range(MAX_TRIALS if sync else 1):
        z_try = z + t.unsqueeze(-1) * d
        vals = tuple(oracle(z_try))
        f, g = vals[0], vals[1]
        dphi = (g * d).sum(-1)
        finite = torch.isfinite(f) & torch.isfinite(dphi)
        armijo = finite & ((dphi <= ARMIJO_C1 * slope) | (f <= f0 + ARMIJO_C1 * t * slope))
        good = armijo & (dphi >= WOLFE_C2 * slope)
        upd = searching & armijo
        t_acc, z_acc = torch.where(upd, t, t_acc), masked(upd, z_try, z_acc)
        vals_acc = tuple(masked(upd, v, a) for v, a in zip(vals, vals_acc, strict=True))
        ok = ok | upd
        searching = searching & ~good
        hi = torch.where(searching & ~armijo, t, hi)
        lo = torch.where(searching & armijo, t, lo)
        t = torch.where(searching, torch.where(torch.isinf(hi), 2 * t, (lo + hi) / 2), t)
        if sync and not bool(searching.any()):
            break
    return t_acc, z_acc, vals_acc, ok, t


def run_lbfgs(oracle: Oracle, z0: torch.Tensor, cfg: DualLBFGS, *, tol: float, ftol: float,
              fscale: torch.Tensor, callback: Callback | None = None) -> Result:
    """Minimise through ``oracle`` from ``z0 (B, d)``; returns a flat :class:`Result`."""
    z = z0
    fz, g, viol, binding = oracle(z)
    tr = Tracker(viol, rtol=0.0, atol=tol, max_iter=cfg.max_iter, check_every=cfg.check_every,
                 callback=callback, nonfinite=~torch.isfinite(fz) | ~torch.isfinite(g).all(-1))
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    R: list[torch.Tensor] = []
    hist: list[tuple[torch.Tensor, torch.Tensor]] = [(fz, viol)]
    gamma = torch.ones_like(fz)
    has_pair = torch.zeros_like(tr.active)
    retry = torch.zeros_like(tr.active)
    t_retry = torch.ones_like(fz)
    tiny = torch.finfo(z.dtype).tiny
    eps = torch.finfo(z.dtype).eps

    for _ in tr:
        d = -_two_loop(g, S, Y, R, gamma)
        slope = (g * d).sum(-1)
        descent = torch.isfinite(slope) & (slope < 0)
        d = masked(descent, d, -g)
        gg = (g * g).sum(-1)
        slope = torch.where(descent, slope, -gg)
        t0 = torch.where(has_pair, 1.0, 1.0 / gg.sqrt().clamp_min(tiny)).clamp_max(1.0)
        _, z_new, (f_new, g_new, v_new, b_new), ok, t_next = convex_line_search(
            oracle, z, d, (fz, g, viol, binding), slope, tr.active, torch.where(retry, t_retry, t0), tr.sync)
        exhausted = ~ok if tr.sync else ~ok & (t_next < 2.0**-10)
        # stall test where the cardinality constraint binds (nonsmooth maximum)
        solved = exhausted & binding
        if len(hist) >= cfg.window:
            f_ref, v_ref = hist[-cfg.window]
            gain = f_ref - f_new
            # the dual stopped improving and the violation stopped shrinking (a nonsmooth maximum;
            # a smooth one is still approached at a steady rate and keeps going)
            solved = solved | (b_new & ok & (gain <= ftol * torch.maximum(f_new.abs(), fscale))
                               & (v_new > 0.5 * v_ref))
        take = tr.advance(v_new, stalled=exhausted & ~has_pair & ~binding if tr.sync else None,
                          nonfinite=~torch.isfinite(z_new).all(-1) | ~torch.isfinite(f_new),
                          solved=solved)
        reset = tr.active & exhausted & has_pair
        retry, t_retry = ~ok & ~reset, t_next
        s, y = z_new - z, g_new - g
        sy, yy = (s * y).sum(-1), (y * y).sum(-1)
        valid = take & ok & (sy > eps * torch.linalg.vector_norm(s, dim=-1)
                             * torch.linalg.vector_norm(y, dim=-1)) & (yy > 0)
        safe_sy = torch.where(valid, sy, torch.ones_like(sy))
        R = [torch.where(reset, 0.0, rho) for rho in R]
        S.append(masked(valid, s, torch.zeros_like(s)))
        Y.append(masked(valid, y, torch.zeros_like(y)))
        R.append(torch.where(valid, 1.0 / safe_sy, torch.zeros_like(sy)))
        S, Y, R = S[-cfg.memory:], Y[-cfg.memory:], R[-cfg.memory:]
        gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
        gamma = torch.where(reset, 1.0, gamma)
        has_pair = (has_pair | valid) & ~reset
        z, fz, g = masked(take, z_new, z), masked(take, f_new, fz), masked(take, g_new, g)
        viol, binding = masked(take, v_new, viol), masked(take, b_new, binding)
        hist.append((fz, viol))
        hist = hist[-cfg.window:]
    return tr.finish(z)


def run_adam(oracle: Oracle, z0: torch.Tensor, cfg: DualAdam, *, tol: float, lr: torch.Tensor,
             gscale: torch.Tensor, callback: Callback | None = None) -> Result:
    """``cfg.max_iter`` Adam steps on ``f`` through ``oracle``; flags from the final violation.

    Args:
        lr: ``(B,)`` absolute step sizes.
        gscale: ``(B,)`` scale of the gradient (the total mass) for ``eps``.
    """
    z = z0
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    b1, b2 = cfg.betas
    lr_ = lr.unsqueeze(-1)
    eps = (cfg.eps * gscale).unsqueeze(-1)
    for t in range(1, cfg.max_iter + 1):
        _, g, viol, _ = oracle(z)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        z = z - lr_ * mhat / (vhat.sqrt() + eps)
        if callback is not None:
            callback(t, viol)
    fz, g, viol, _ = oracle(z)
    finite = torch.isfinite(fz) & torch.isfinite(z).all(-1)
    converged = finite & (viol <= tol)
    iters = torch.full_like(viol, cfg.max_iter, dtype=torch.int64)
    extra = torch.where(finite, 0, int(Status.NONFINITE)).to(torch.int64)
    return Result(solution=z, converged=converged, iterations=iters, residual=viol,
                  status=status_from(converged, viol, extra=extra))

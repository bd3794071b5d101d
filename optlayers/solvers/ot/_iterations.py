"""The Sinkhorn iteration in the log domain, on flat batches ``(B, n)`` / ``(B, m)``.

Updates (balanced when ``ρ = None``; KL-relaxed marginals with ``λ = ρ/(ρ+ε)`` otherwise):

.. math::
    g \\leftarrow \\lambda_b\\,\\operatorname{softmin}_\\varepsilon(C^\\top - f - \\varepsilon\\log a),
    \\qquad
    f \\leftarrow \\lambda_a\\,\\operatorname{softmin}_\\varepsilon(C - g - \\varepsilon\\log b).

After a ``g``-update the column marginals of ``P(f, g)`` are exact, and the row marginals are
``a_i exp((f_i − f^+_i)/ε)`` where ``f^+`` is the next ``f``-update, so the L1 marginal error
``Σ_i a_i |exp((f_i − f^+_i)/ε) − 1|`` comes for free with every iteration: the stopping test
costs no extra pass. The returned ``(f, g)`` is the pair whose error was measured.

Also here: ε-annealing where every stage runs to its own tolerance, Anderson acceleration
on ``f``, per-problem convergence masks (a converged problem is frozen while the others
continue), non-finite detection and the balanced gauge normalization ``⟨a, f⟩ = ⟨b, g⟩``.

Evaluation of the soft-min: through :mod:`optlayers.kernels` (``"ot.softmin"``: reference,
Numba or Triton, ``OPTLAYERS_KERNELS`` forces one) — except, for a stored cost outside autograd
and with no backend forced, as two matrix-vector products per iteration on a stabilized kernel
(:mod:`._scaling`), which computes the same log-domain iterates to working precision and falls
back to the dispatched soft-min (and re-absorbs the potentials) whenever it cannot vouch for a
result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..._result import Result, Status
from ...kernels import forced_backend
from ...kernels.softmin_reference import DenseSource
from ._scaling import MAX_ENTRIES, StabilizedKernel
from .geometry import Geometry, _needs_autograd
from .plan import safe_log

__all__ = ["Anneal", "AndersonAcceleration", "solve_potentials", "default_tol", "lambdas"]


@dataclasses.dataclass(frozen=True)
class Anneal:
    """ε-annealing (ε-scaling): solve at ``ε_k = max(ε, init · decay^k)``, ``k = 0, 1, ...``.

    Unlike GeomLoss's fixed schedule, each stage runs until its own stopping test holds: the
    L1 marginal error below ``stage_tol`` (intermediate stages) or below the solver's ``tol``
    (the last stage), each stage warm-started from the previous one.

    Args:
        decay: Factor in ``(0, 1)`` between stages (GeomLoss's ``scaling``).
        init: Absolute starting ε; ``None`` (default): the largest cost entry between points
            of positive weight (the squared diameter for ``‖x − y‖²``).
        stage_tol: L1 marginal error required at intermediate stages (default ``1e-2``).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn, Anneal, PointCloud
        >>> geom = PointCloud(torch.rand(30, 2, dtype=torch.float64), torch.rand(20, 2, dtype=torch.float64))
        >>> plain = sinkhorn(None, None, geom, epsilon=1e-2)
        >>> annealed = sinkhorn(None, None, geom, epsilon=1e-2, anneal=Anneal(decay=0.5))
        >>> torch.allclose(annealed.aux.value, plain.aux.value, atol=1e-8)   # same fixed point
        True
    """

    decay: float = 0.5
    init: float | None = None
    stage_tol: float = 1e-2

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.init is not None and not self.init > 0:
            raise ValueError(f"init must be positive or None, got {self.init}")
        if not self.stage_tol > 0:
            raise ValueError(f"stage_tol must be positive, got {self.stage_tol}")


@dataclasses.dataclass(frozen=True)
class AndersonAcceleration:
    """Anderson acceleration (type II) of the map ``f ↦ f⁺`` on log-domain potentials.

    With the last ``L + 1`` iterates ``f_k`` and residuals ``r_k = T(f_k) − f_k``, the next
    iterate is ``f_L + r_L − (ΔF + ΔR) γ`` where ``ΔF, ΔR`` hold the successive differences and

    .. math::
        \\gamma = \\arg\\min_\\gamma \\|\\Delta R\\,\\gamma - r_L\\|^2
            + \\lambda \\|\\gamma\\|^2 ,

    ``λ = ridge`` times the mean of ``diag(ΔRᵀΔR)``. The fixed point (and so the result) is
    unchanged; only the iteration count drops.

    Args:
        memory: Number of past iterates mixed (5-8 is typical).
        ridge: Tikhonov regularization of the least-squares mixing problem, relative to its scale.

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import sinkhorn, AndersonAcceleration, PointCloud
        >>> geom = PointCloud(torch.rand(30, 2, dtype=torch.float64), torch.rand(20, 2, dtype=torch.float64))
        >>> plain = sinkhorn(None, None, geom, epsilon=1e-2)
        >>> fast = sinkhorn(None, None, geom, epsilon=1e-2, acceleration=AndersonAcceleration(memory=5))
        >>> bool(fast.iterations < plain.iterations)
        True
        >>> torch.allclose(fast.aux.value, plain.aux.value, atol=1e-8)
        True
    """

    memory: int = 5
    ridge: float = 1e-10

    def __post_init__(self) -> None:
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be a positive int, got {self.memory}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be nonnegative, got {self.ridge}")


def default_tol(dtype: torch.dtype, tol: float | None) -> float:
    """Default L1 marginal tolerance: ``1e-6`` in float64, ``1e-4`` in lower precision."""
    if tol is not None:
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        return tol
    return 1e-6 if dtype == torch.float64 else 1e-4


def lambdas(rho: float | None, eps: torch.Tensor) -> torch.Tensor | float:
    """``λ = ρ/(ρ + ε)`` as a ``(B, 1)`` column (1 for a hard marginal constraint)."""
    if rho is None or math.isinf(rho):
        return 1.0
    return (rho / (rho + eps))[:, None]


def _anderson(f_hist: list[torch.Tensor], r_hist: list[torch.Tensor],
              ridge: float) -> torch.Tensor:
    """Type-II Anderson extrapolation from iterates ``f_k`` and residuals ``r_k = T(f_k) − f_k``."""
    F = torch.stack(f_hist, -1)  # (B, n, L+1)
    R = torch.stack(r_hist, -1)
    dF = F[..., 1:] - F[..., :-1]
    dR = R[..., 1:] - R[..., :-1]
    gram = dR.transpose(-1, -2) @ dR  # (B, L, L)
    L = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(L, dtype=gram.dtype, device=gram.device)
    gram = gram + (ridge * scale + torch.finfo(gram.dtype).tiny)[:, None, None] * eye
    rhs = dR.transpose(-1, -2) @ R[..., -1:]
    gamma = torch.linalg.solve(gram, rhs)  # (B, L, 1)
    return F[..., -1] + R[..., -1] - ((dF + dR) @ gamma)[..., 0]


def solve_potentials(geom: Geometry, a: torch.Tensor, b: torch.Tensor, eps: torch.Tensor, *,
                     rho_a: float | None, rho_b: float | None, tol: float, max_iter: int,
                     anneal: Anneal | None, acceleration: AndersonAcceleration | None,
                     f0: torch.Tensor | None, check_every: int | None,
                     callback: Callable[[int, torch.Tensor], None] | None,
                     symmetric: bool = False) -> Result:
    """Run log-domain Sinkhorn on a flat batch; returns ``Result(solution=(f, g))``.

    Differentiable when run under autograd (out-of-place updates: the ``Unroll`` mode).

    Args:
        geom: The geometry (batch ``B``).
        a: ``(B, n)`` weights; b: ``(B, m)``.
        eps: ``(B,)`` target temperatures.
        rho_a, rho_b: KL marginal strengths (None: hard constraint).
        tol: L1 marginal error tolerance of the final stage.
        max_iter: Total iterations over all stages.
        anneal: ε-annealing schedule or None.
        acceleration: Anderson acceleration or None.
        f0: ``(B, n)`` warm start or None.
        check_every: Host-side convergence check period; None runs ``max_iter`` iterations
            (split evenly over the stages) without host synchronisation.
        callback: Called as ``callback(iteration, residual)``.
        symmetric: The problem is symmetric (``a = b``, ``C = Cᵀ``): iterate the averaged update
            ``f ← ½(f + λ softmin(C − f − ε log a))`` (one soft-min per iteration; GeomLoss's
            symmetric update), whose fixed point is ``f = g``. It converges fast where the
            alternating update crawls (nearly diagonal plans, e.g. ``OT(a, a)`` at small ε).
    """
    B, n = a.shape
    dtype, device = a.dtype, a.device
    loga, logb = safe_log(a), safe_log(b)
    balanced = rho_a is None and rho_b is None

    # stages of the ε schedule, each (B,)
    if anneal is None:
        stages = [eps]
    else:
        if anneal.init is not None:
            init = torch.full_like(eps, anneal.init)
        else:
            init = geom.reduce_cost(a.detach(), b.detach(), "max").to(eps.dtype)
        init = torch.maximum(init.detach(), eps.detach())
        ratio = float((init / eps.detach()).max())
        K = 0 if not math.isfinite(ratio) or ratio <= 1.0 else math.ceil(math.log(ratio) / math.log(1.0 / anneal.decay))
        stages = [torch.maximum(eps, init * anneal.decay ** k) for k in range(K)] + [eps]

    # non-finite inputs fail at once
    finite = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1) & torch.isfinite(eps) & (eps > 0)
    for t in geom.tensors():
        finite = finite & torch.isfinite(t.reshape(B, -1)).all(-1)
    failed = ~finite
    done = torch.zeros(B, dtype=torch.bool, device=device)
    iters = torch.zeros(B, dtype=torch.int64, device=device)
    residual = torch.full((B,), math.inf, dtype=dtype, device=device)

    # stored cost outside autograd: soft-mins as matrix-vector products on a stabilized kernel
    # (exact to working precision, see _scaling.py) unless a kernel backend is forced
    stored: torch.Tensor | None = None
    # (it checks its results on the host, so the fixed-iteration mode check_every=None, which
    # promises no host synchronisation, keeps the plain soft-min)
    if (check_every is not None and not geom.is_online and B * n * b.shape[1] <= MAX_ENTRIES
            and forced_backend() is None
            and not _needs_autograd(a, b, eps, f0, *geom.tensors())):
        src = geom.source(False)
        if isinstance(src, DenseSource):
            stored = src.cost

    f = torch.zeros(B, n, dtype=dtype, device=device) if f0 is None else f0.to(dtype)
    f = torch.where(finite[:, None], f, torch.zeros_like(f))
    g = torch.zeros(B, b.shape[1], dtype=dtype, device=device)
    total = 0
    fixed = check_every is None
    per_stage = max(1, max_iter // len(stages)) if fixed else max_iter

    for k, eps_k in enumerate(stages):
        last = k == len(stages) - 1
        final_k = eps_k == eps if not last else torch.ones_like(done)
        tol_k = torch.where(final_k, torch.full_like(eps_k, tol),
                            torch.full_like(eps_k, anneal.stage_tol if anneal is not None else tol))
        lam_a, lam_b = lambdas(rho_a, eps_k), lambdas(rho_b, eps_k)
        e = eps_k[:, None]
        sk = StabilizedKernel(stored, eps_k) if stored is not None else None
        stale = [sk is not None]

        def smin(h: torch.Tensor, axis: int, active: torch.Tensor, eps_k: torch.Tensor = eps_k,
                 sk: StabilizedKernel | None = sk, stale: list[bool] = stale) -> torch.Tensor:
            if sk is not None:
                out = sk.softmin(h, axis, active)
                if out is not None:
                    return out
                stale[0] = True  # computed exactly below; absorb the new potentials next
            return geom.softmin(h, eps_k, axis=axis)

        frozen = done | failed  # finished problems do not move
        if symmetric:
            g = f
        else:
            g = torch.where(frozen[:, None], g, lam_b * smin(f + e * loga, 0, ~frozen))
        f_hist: list[torch.Tensor] = []
        r_hist: list[torch.Tensor] = []
        prev_err = torch.full((B,), math.inf, dtype=dtype, device=device)
        stage_iter = 0
        while True:
            if sk is not None and stale[0]:
                stale[0] = not sk.rebuild(f, g)
            f_new = lam_a * smin(g + e * logb, 1, ~frozen)
            ratio_k = torch.exp((f - f_new) / e)
            err = (a * (ratio_k - 1.0).abs()).sum(-1)
            if symmetric:  # rows and columns of P(f, f) have the same error
                err = 2.0 * err
                f_new = 0.5 * (f + f_new)
            active = ~frozen
            bad = active & (torch.isnan(err) | ~torch.isfinite(f_new).all(-1))
            err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
            failed = failed | bad
            ok = active & (err <= tol_k)
            residual = torch.where(active & final_k, err, residual)
            done = done | (ok & final_k)
            frozen = frozen | ok | bad
            iters = iters + active.to(torch.int64)
            total += 1
            stage_iter += 1
            if callback is not None:
                callback(total, err)
            if total >= max_iter or (fixed and stage_iter >= per_stage):
                break
            if check_every is not None and total % check_every == 0 and bool(frozen.all()):
                break
            f_next = f_new
            if acceleration is not None:
                grew = err > prev_err
                if bool(grew.any()) if not fixed else False:
                    f_hist, r_hist = [], []
                f_hist.append(f)
                r_hist.append(f_new - f)
                if len(f_hist) > acceleration.memory + 1:
                    f_hist.pop(0)
                    r_hist.pop(0)
                if len(f_hist) >= 2:
                    f_acc = _anderson(f_hist, r_hist, acceleration.ridge)
                    use = torch.isfinite(f_acc).all(-1) & ~grew
                    f_next = torch.where(use[:, None], f_acc, f_new)
                prev_err = err
            move = ~frozen
            f = torch.where(move[:, None], f_next, f)
            if symmetric:
                g = f
            else:
                g = torch.where(move[:, None], lam_b * smin(f + e * loga, 0, move), g)
        if total >= max_iter and not last:
            # out of iterations before the last stage: report the current error as residual
            residual = torch.where(done, residual, err)
            break

    if balanced:
        # gauge: shift so that <a, f> = <b, g>
        c = ((b * g).sum(-1) - (a * f).sum(-1)) / (a.sum(-1) + b.sum(-1))
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        f = f + c[:, None]
        g = g - c[:, None]
    status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=device)
    status = torch.where(failed, torch.full_like(status, int(Status.NONFINITE)), status)
    status = torch.where(done, torch.zeros_like(status), status)
    return Result((f, g), done, iters, residual, status, ())

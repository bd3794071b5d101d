r"""PDHG for batches of linear programs and convex QPs with a diagonal quadratic term (PDLP).

Problem (after :func:`~optlayers.solvers.lp._data.prepare_lp`):

.. math::

    \min_{l \le x \le u} c^\top x + \tfrac12 x^\top \operatorname{diag}(q) x
    \quad\text{s.t.}\quad K_{E} x = b_{E},\; K_{I} x \ge b_{I},

solved through the saddle point
:math:`\min_{x \in X}\max_{y \in Y} c^\top x + \tfrac12 x^\top Q x - y^\top K x + b^\top y`
(:math:`y_I \ge 0`) by the primal–dual hybrid gradient method with the PDLP recipe
(Applegate et al., 2021): diagonal Ruiz + Pock–Chambolle preconditioning, the adaptive step
rule, the primal weight :math:`\omega` (``τ = η/ω``, ``σ = ηω``) updated at restarts, adaptive
restarts to the average or current iterate chosen by a KKT-error potential, primal and dual
infeasibility detection from iterate differences, and feasibility polishing. One iteration is

.. math::

    x' = \Pi_X\!\Big(\frac{x - \tau (c - K^\top y)}{1 + \tau q}\Big), \qquad
    y' = \Pi_Y\big(y + \sigma (b - K(2x' - x))\big),

(the exact proximal step of the separable quadratic), accepted when
:math:`\eta \le \lVert z' - z\rVert_\omega^2 / (2 |(y'-y)^\top K (x'-x)|)`.

Termination, in the original (unscaled) units, per batch element:

.. math::

    \lVert r_p \rVert_2 \le \epsilon_a + \epsilon_r \lVert b\rVert_2,\quad
    \lVert r_d \rVert_2 \le \epsilon_a + \epsilon_r \lVert c\rVert_2,\quad
    |p - d| \le \epsilon_a + \epsilon_r (|p| + |d|),

with :math:`r_p` the equality residual and inequality violation, :math:`r_d` the part of the
reduced cost :math:`c + Qx - K^\top y` that the bounds cannot absorb, and :math:`p, d` the primal
and dual objectives.

References:
    Applegate, Díaz, Hinder, Lu, Lubin, O'Donoghue, Schudy (2021). Practical large-scale linear
    programming using primal-dual hybrid gradient. NeurIPS.
    Applegate, Hinder, Lu, Lubin (2023). Faster first-order primal-dual methods for linear
    programming using restarts and sharpness. Math. Programming.
    Lu, Yang (2023). cuPDLP.jl. arXiv:2311.12180.
    Applegate et al. (2025). PDLP: A practical first-order method for large-scale linear
    programming (feasibility polishing). arXiv:2501.07018.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..._result import Status
from ._data import LPData
from .preconditioning import LinOp, ruiz_pock_chambolle

__all__ = ["PDHG", "PDHGState", "run_pdhg", "kkt_parts"]


@dataclasses.dataclass(frozen=True)
class PDHG:
    """PDHG (PDLP) solver configuration.

    Args:
        rtol: Relative tolerance of the termination test (module docstring). The default
            ``1e-8`` gives relative objective gaps and residuals far below ``1e-6``.
        atol: Absolute tolerance of the termination test.
        max_iter: Maximum number of iterations (step attempts) per batch element.
        check_every: Evaluate termination, restarts and infeasibility every this many
            iterations; ``None`` runs exactly ``max_iter`` iterations with no host
            synchronisation and checks once at the end (no restarts then).
        restart: ``"adaptive"`` (PDLP's KKT-potential restarts) or ``"none"``.
        restart_to: Restart candidate: ``"best"`` (average or current, lower KKT error),
            ``"average"`` or ``"current"``.
        step: ``"adaptive"`` (PDLP's rule) or ``"constant"`` (``η = 0.998/‖K̃‖₂`` by power
            iteration, i.e. Chambolle–Pock).
        ruiz_iters: Ruiz ℓ∞ equilibration passes.
        pock_chambolle: Apply the Pock–Chambolle (α = 1) pass after Ruiz.
        primal_weight_update: Update the primal weight at restarts (else keep ``ω₀``).
        primal_weight_smoothing: θ in ``log ω ← θ log(Δy/Δx) + (1-θ) log ω``.
        polish: Feasibility polishing: after convergence, project ``x`` onto the feasible set
            by PDHG on ``min ½‖x' − x‖²`` (a diagonal QP) until the largest constraint
            violation is at most ``polish_tol · max(1, ‖b‖∞)``.
        polish_tol: Target of polishing (absolute, relative to ``max(1, ‖b‖∞)``).
        polish_max_iter: Iteration budget of polishing; if it is exhausted the unpolished
            point is kept and ``aux.polished`` is False.
        infeasibility_tol: A ray certifies infeasibility when its residual is at most this
            times its objective.
        beta_sufficient, beta_necessary, beta_artificial: Restart thresholds (cuPDLP values).

    Example:
        >>> from optlayers.solvers.lp import PDHG
        >>> fast = PDHG(rtol=1e-4, polish=False)
    """

    rtol: float = 1e-8
    atol: float = 1e-10
    max_iter: int = 100_000
    check_every: int | None = 64
    restart: Literal["adaptive", "none"] = "adaptive"
    restart_to: Literal["best", "average", "current"] = "best"
    step: Literal["adaptive", "constant"] = "adaptive"
    ruiz_iters: int = 10
    pock_chambolle: bool = True
    primal_weight_update: bool = True
    primal_weight_smoothing: float = 0.5
    polish: bool = True
    polish_tol: float = 1e-10
    polish_max_iter: int = 20_000
    infeasibility_tol: float = 1e-8
    beta_sufficient: float = 0.2
    beta_necessary: float = 0.8
    beta_artificial: float = 0.36

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "polish_tol", "infeasibility_tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {self.max_iter!r}")
        if self.check_every is not None and (not isinstance(self.check_every, int) or self.check_every < 1):
            raise ValueError(f"check_every must be a positive int or None, got {self.check_every!r}")
        _choice("restart", self.restart, ("adaptive", "none"))
        _choice("restart_to", self.restart_to, ("best", "average", "current"))
        _choice("step", self.step, ("adaptive", "constant"))
        if not isinstance(self.ruiz_iters, int) or self.ruiz_iters < 0:
            raise ValueError(f"ruiz_iters must be an int >= 0, got {self.ruiz_iters!r}")
        if not 0.0 <= self.primal_weight_smoothing <= 1.0:
            raise ValueError(f"primal_weight_smoothing must be in [0, 1], got {self.primal_weight_smoothing}")
        if not 0 < self.beta_sufficient <= self.beta_necessary < 1:
            raise ValueError("need 0 < beta_sufficient <= beta_necessary < 1")
        if not 0 < self.beta_artificial < 1:
            raise ValueError(f"beta_artificial must be in (0, 1), got {self.beta_artificial}")
        if not isinstance(self.polish_max_iter, int) or self.polish_max_iter < 1:
            raise ValueError(f"polish_max_iter must be a positive int, got {self.polish_max_iter!r}")

    def _prediction_correction(self) -> tuple[float, float] | None:
        """``(ν, α)`` of the prediction–correction variant; ``None`` for PDHG itself."""
        return None


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {list(valid)}")


@dataclasses.dataclass
class PDHGState:
    """Raw outcome of :func:`run_pdhg` in original units (flat batch ``B``)."""

    x: Tensor
    y: Tensor
    converged: Tensor
    status: Tensor
    iterations: Tensor
    residual: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor
    primal_objective: Tensor
    dual_objective: Tensor
    polished: Tensor
    restarts: Tensor


def kkt_parts(x: Tensor, y: Tensor, Kx: Tensor, KTy: Tensor, c: Tensor, q: Tensor, rhs: Tensor,
              lower: Tensor, upper: Tensor, eq: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Primal residual ``(B, m)``, dual residual ``(B, n)``, primal and dual objectives ``(B,)``."""
    rp = rhs - Kx
    rp = torch.where(eq, rp, rp.clamp_min(0))
    lam = c + q * x - KTy
    lfin, ufin = torch.isfinite(lower), torch.isfinite(upper)
    lam_pos = torch.where(lfin, lam.clamp_min(0), torch.zeros_like(lam))
    lam_neg = torch.where(ufin, (-lam).clamp_min(0), torch.zeros_like(lam))
    rd = lam - lam_pos + lam_neg
    quad = 0.5 * (q * x * x).sum(-1)
    pobj = (c * x).sum(-1) + quad
    lo = torch.where(lfin, lower, torch.zeros_like(lower))
    hi = torch.where(ufin, upper, torch.zeros_like(upper))
    dobj = (rhs * y).sum(-1) + (lo * lam_pos).sum(-1) - (hi * lam_neg).sum(-1) - quad
    return rp, rd, pobj, dobj


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=-1)


def _power_norm(K: LinOp, B: int, like: Tensor, iters: int = 30) -> Tensor:
    """Estimate ``‖K‖₂`` per problem by power iteration on ``KᵀK``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(B, K.n, generator=g, dtype=like.dtype).to(like.device)
    v = v / _norm(v).clamp_min(1e-300).unsqueeze(-1)
    s = like.new_ones(B)
    for _ in range(iters):
        w = K.rmv(K.mv(v))
        s = _norm(w).sqrt()
        v = w / _norm(w).clamp_min(1e-300).unsqueeze(-1)
    return s.clamp_min(1e-12)


@dataclasses.dataclass
class _Scaled:
    K: LinOp
    c: Tensor
    q: Tensor
    rhs: Tensor
    lower: Tensor
    upper: Tensor
    dr: Tensor
    dc: Tensor


def _scale(data: LPData, cfg: PDHG) -> _Scaled:
    qs = data.q if data.has_q else None
    K, dr, dc = ruiz_pock_chambolle(data.K, qs, ruiz_iters=cfg.ruiz_iters, pock_chambolle=cfg.pock_chambolle)
    return _Scaled(K=K, c=data.c * dc, q=data.q * dc * dc, rhs=data.rhs * dr, lower=data.lower / dc,
                   upper=data.upper / dc, dr=dr, dc=dc)


def run_pdhg(data: LPData, cfg: PDHG, x0: Tensor | None = None, y0: Tensor | None = None,
             callback: Callable[[int, Tensor], None] | None = None) -> PDHGState:
    """Solve a prepared batch with PDHG; returns original-unit solutions and statistics.

    Args:
        data: Output of :func:`~optlayers.solvers.lp._data.prepare_lp`.
        cfg: Solver configuration.
        x0, y0: Optional warm start ``(B, n)``, ``(B, m)`` in original units.
        callback: Called at every check as ``callback(iteration, residual)``.
    """
    sc = _scale(data, cfg)
    B, n, m = data.B, data.n, data.m
    eq = data.eq_mask
    x = sc.lower.new_zeros(B, n) if x0 is None else x0.detach().to(sc.c.dtype).reshape(B, n) / sc.dc
    x = torch.maximum(torch.minimum(x, sc.upper), sc.lower)
    y = sc.c.new_zeros(B, m) if y0 is None else y0.detach().to(sc.c.dtype).reshape(B, m) / sc.dr
    y = torch.where(eq, y, y.clamp_min(0))
    finite_in = torch.isfinite(data.c).all(-1) & torch.isfinite(data.rhs).all(-1) & torch.isfinite(data.q).all(-1)
    finite_in = finite_in & ~torch.isnan(data.lower).any(-1) & ~torch.isnan(data.upper).any(-1)
    kfin = torch.isfinite(data.K.values).all() if data.K.sparse else torch.isfinite(data.K.K).flatten(1).all(-1)
    finite_in = finite_in & kfin
    out = _loop(sc, data, cfg, x, y, eq, mode="optimize", callback=callback, finite_in=finite_in)
    if cfg.polish and data.m > 0:
        out = _polish(sc, data, cfg, out, eq)
    return out


def _loop(sc: _Scaled, data: LPData, cfg: PDHG, x: Tensor, y: Tensor, eq: Tensor, *, mode: str,
          callback: Callable[[int, Tensor], None] | None, finite_in: Tensor,
          max_iter: int | None = None, feas_tol: Tensor | None = None) -> PDHGState:
    """The iteration shared by :class:`PDHG` and the prediction–correction variant.

    Per iteration only the step itself runs (a handful of fused tensor ops and two or three
    products with ``K``); termination, restarts, the ``K``-products of the average and the
    infeasibility tests run every ``check_every`` iterations. On the CPU one host read per
    iteration (did every element accept its step?) selects a branch without ``torch.where``.
    """
    K = sc.K
    B = x.shape[0]
    dtype = x.dtype
    max_iter = cfg.max_iter if max_iter is None else max_iter
    pc = cfg._prediction_correction()
    c, q, rhs, lo, hi = sc.c, sc.q, sc.rhs, sc.lower, sc.upper
    qpos = q.clamp_min(0)
    Kx, KTy = K.mv(x), K.rmv(y)
    # original-unit data for termination
    oc, oq, orhs, olo, ohi = data.c, data.q, data.rhs, data.lower, data.upper
    if mode == "polish":
        oc, oq = -(x * sc.dc), torch.ones_like(data.c)
        c, q = oc * sc.dc, sc.dc * sc.dc
        qpos = q
    bnorm, cnorm = _norm(orhs), _norm(oc)
    kmax = K.max_abs().to(dtype)
    if pc is None:
        eta = (1.0 / kmax.clamp_min(1e-12)).expand(B).clone()
        if cfg.step == "constant":
            eta = 0.998 / _power_norm(K, B, x)
    else:
        nu = pc[0]
        if cfg.step == "constant":  # the classical (full-spectrum) step: τσ‖K̃‖² = ν
            eta = math.sqrt(nu) / _power_norm(K, B, x)
        else:  # the average spectrum: τσ · ‖K̃‖²_F / min(m, n) = ν
            avg = K.fro2().to(dtype) / max(1, min(K.m, K.n))
            eta = (math.sqrt(nu) / avg.clamp_min(1e-24).sqrt()).expand(B).clone()
    cn, bn = _norm(c), _norm(rhs)
    omega = torch.where((cn > 1e-10) & (bn > 1e-10), cn / bn.clamp_min(1e-300), torch.ones_like(cn))
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    active = finite_in.clone()
    done_status = torch.where(finite_in, torch.full((B,), int(Status.MAX_ITER)),
                              torch.full((B,), int(Status.NONFINITE)))
    done_status = done_status.to(x.device)
    converged = torch.zeros(B, dtype=torch.bool, device=x.device)
    # outputs (scaled)
    x_out, y_out = x.clone(), y.clone()
    # the point that is evaluated, averaged and returned: the iterate (PDHG) or the prediction (PC)
    xe, ye, Kxe, KTye = x, y, Kx, KTy
    # weighted sums of the evaluated points (their K-products are formed at checks)
    sx, sy = torch.zeros_like(x), torch.zeros_like(y)
    sw = torch.zeros(B, dtype=dtype, device=x.device)
    # restart bookkeeping
    x_r, y_r = x.clone(), y.clone()
    phi_last = torch.full((B,), float("inf"), dtype=dtype, device=x.device)
    phi_prev = phi_last.clone()
    since = torch.zeros(B, dtype=dtype, device=x.device)
    total = torch.zeros(B, dtype=dtype, device=x.device)
    restarts = torch.zeros(B, dtype=torch.int64, device=x.device)
    pending = 0  # accepted steps of the all-accepted fast path not yet added to the counters
    # windows for infeasibility detection
    x_c, y_c, Kx_c, KTy_c = x.clone(), y.clone(), Kx.clone(), KTy.clone()
    res_out = torch.full((B,), float("inf"), dtype=dtype, device=x.device)
    stats: dict[str, Tensor] = {}
    check = cfg.check_every
    first_check = True

    has_q = bool((qpos != 0).any())
    ylow = torch.where(eq, torch.full_like(rhs[:1], float("-inf")), torch.zeros_like(rhs[:1]))
    cpu = x.device.type == "cpu"
    adaptive = cfg.step == "adaptive"
    rays: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    upd = active
    neg_c = -c
    # one problem on the CPU: the step-size logic runs on Python floats (one host read per
    # iteration, which the acceptance test needs anyway) instead of ~15 tiny tensor ops
    scalar = B == 1 and cpu and adaptive and bool(active.all())
    eta_f = float(eta[0]) if scalar else 0.0
    omega_f = float(omega[0]) if scalar else 0.0
    sw_f, acc_f = 0.0, 0
    for it in range(max_iter):
        last = it == max_iter - 1
        is_check = last or (check is not None and (it + 1) % check == 0)
        if scalar:
            kk = it + 2.0
            tau_f, sigma_f = eta_f / omega_f, eta_f * omega_f
            xn = torch.add(x, KTy + neg_c, alpha=tau_f)
            if has_q:
                xn = xn / (1 + tau_f * qpos)
            xn = torch.clamp(xn, lo, hi)
            Kxn = K.mv(xn)
            if pc is None:
                dKx = Kxn - Kx
                yn = torch.maximum(torch.add(y, (rhs - Kxn) - dKx, alpha=sigma_f), ylow)
                KTyn = K.rmv(yn)
                dx, dy = xn - x, yn - y
                nx2, ny2, inter = torch.stack([torch.linalg.vecdot(dx, dx), torch.linalg.vecdot(dy, dy),
                                               torch.linalg.vecdot(dy, dKx)]).view(-1).tolist()
                move = 0.5 * (omega_f * nx2 + ny2 / omega_f)
                inter = abs(inter)
                limit = move / inter if inter > 0 else math.inf
                if is_check:
                    rays = (dx, dKx, dy, KTyn - KTy)
            else:
                yn = torch.maximum(torch.add(y, rhs - Kxn, alpha=sigma_f), ylow)
                KTyn = K.rmv(yn)
                dy, dKTy = yn - y, KTyn - KTy
                ny2, nk2 = torch.stack([torch.linalg.vecdot(dy, dy), torch.linalg.vecdot(dKTy, dKTy)]).view(-1).tolist()
                limit = math.sqrt(pc[0] * ny2 / nk2) if nk2 > 0 else math.inf
                if is_check:
                    rays = (xn - xe, Kxn - Kxe, dy, KTyn - KTye)
            ok_step = not eta_f > limit
            eta_next = min((1 - kk ** -0.3) * limit, (1 + kk ** -0.6) * eta_f)
            if ok_step:
                if pc is None:
                    x, y, Kx, KTy = xn, yn, Kxn, KTyn
                    xe, ye, Kxe, KTye = x, y, Kx, KTy
                else:
                    alpha = pc[1]
                    xe, ye, Kxe, KTye = xn, yn, Kxn, KTyn
                    if alpha == 1.0:
                        x, y, KTy = torch.add(xn, dKTy, alpha=tau_f), yn, KTyn
                    else:
                        x = torch.add(torch.lerp(x, xn, alpha), dKTy, alpha=alpha * tau_f)
                        y, KTy = torch.lerp(y, yn, alpha), torch.lerp(KTy, KTyn, alpha)
                    Kx = K.mv(x)
                sx.add_(xn, alpha=eta_f)
                sy.add_(yn, alpha=eta_f)
                sw_f += eta_f
                acc_f += 1
            pending += 1
            eta_f = eta_next if math.isfinite(eta_next) else eta_f
            if not is_check:
                continue
            eta = torch.full_like(eta, eta_f)
            iters = iters + pending
            since, total, sw = since + acc_f, total + acc_f, sw + sw_f
            pending, acc_f, sw_f = 0, 0, 0.0
        else:
            tau = (eta / omega).unsqueeze(-1)
            sigma = (eta * omega).unsqueeze(-1)
            kk = it + 2.0
            # prediction (PC) or the step (PDHG): x⁺ = Π_X((x − τ(c − Kᵀy)) / (1 + τq))
            xn = torch.addcmul(x, tau, KTy + neg_c)
            if has_q:
                xn = xn / (1 + tau * qpos)
            xn = torch.clamp(xn, lo, hi)
            Kxn = K.mv(xn)
            if pc is None:  # y⁺ = Π_Y(y + σ(b − K(2x⁺ − x)))
                yn = torch.addcmul(y, sigma, torch.add(rhs + Kx, Kxn, alpha=-2.0))
            else:  # Arrow–Hurwicz prediction: ỹ = Π_Y(y + σ(b − K x̃))
                yn = torch.addcmul(y, sigma, rhs - Kxn)
            yn = torch.maximum(yn, ylow)
            KTyn = K.rmv(yn)
            eta_new = eta
            if pc is None:
                if adaptive:
                    dy, dKx, dx = yn - y, Kxn - Kx, xn - x
                    inter = torch.linalg.vecdot(dy, dKx).abs_()
                    move = 0.5 * (omega * torch.linalg.vecdot(dx, dx) + torch.linalg.vecdot(dy, dy) / omega)
                    limit = move / inter  # inf where inter = 0; NaN (a fixed point) counts as accepted
                    accept = ~(eta > limit)
                    eta_new = torch.fmin((1 - kk ** -0.3) * limit, (1 + kk ** -0.6) * eta)
                    upd = accept & active
            else:
                dy, dKTy = yn - y, KTyn - KTy
                if adaptive:  # accept iff τσ‖Kᵀ(ỹ − y)‖² ≤ ν‖ỹ − y‖²  (the G-norm of the correction is positive)
                    limit = torch.sqrt(nu * torch.linalg.vecdot(dy, dy) / torch.linalg.vecdot(dKTy, dKTy))
                    accept = ~(eta > limit)
                    eta_new = torch.fmin((1 - kk ** -0.3) * limit, (1 + kk ** -0.6) * eta)
                    upd = accept & active
            all_upd = cpu and bool(upd.all())
            if pc is None:
                if is_check:
                    rays = (xn - x, Kxn - Kx, yn - y, KTyn - KTy)
                nx, ny, nKx, nKTy = xn, yn, Kxn, KTyn
                exn, eyn, eKxn, eKTyn = xn, yn, Kxn, KTyn
            else:
                if is_check:
                    rays = (xn - xe, Kxn - Kxe, yn - ye, KTyn - KTye)
                # correction: x⁺ = x + α(x̃ − x) + ατKᵀ(ỹ − y),  y⁺ = y + α(ỹ − y)
                alpha = pc[1]
                if alpha == 1.0:
                    nx = torch.addcmul(xn, tau, dKTy)
                    ny, nKTy = yn, KTyn
                else:
                    nx = torch.addcmul(torch.lerp(x, xn, alpha), tau, dKTy, value=alpha)
                    ny, nKTy = torch.lerp(y, yn, alpha), torch.lerp(KTy, KTyn, alpha)
                nKx = K.mv(nx)
                exn, eyn, eKxn, eKTyn = xn, yn, Kxn, KTyn
            if all_upd:
                x, y, Kx, KTy = nx, ny, nKx, nKTy
                xe, ye, Kxe, KTye = exn, eyn, eKxn, eKTyn
                w = eta.unsqueeze(-1)
                sw = sw + eta
                eta = eta_new
                pending += 1
            else:
                u1 = upd.unsqueeze(-1)
                w = torch.where(u1, eta.unsqueeze(-1), 0.0)
                sw = sw + w.squeeze(-1)
                x, y = torch.where(u1, nx, x), torch.where(u1, ny, y)
                Kx, KTy = torch.where(u1, nKx, Kx), torch.where(u1, nKTy, KTy)
                if pc is None:
                    xe, ye, Kxe, KTye = x, y, Kx, KTy
                else:
                    xe, ye = torch.where(u1, exn, xe), torch.where(u1, eyn, ye)
                    Kxe, KTye = torch.where(u1, eKxn, Kxe), torch.where(u1, eKTyn, KTye)
                eta = torch.where(active, eta_new, eta)
                iters = iters + active.to(torch.int64)
                since = since + upd.to(dtype)
                total = total + upd.to(dtype)
            sx.addcmul_(w, exn)
            sy.addcmul_(w, eyn)
            if not is_check:
                continue
        # ---------------------------------------------------------------- checks
        if pending:
            iters, since, total = iters + pending, since + pending, total + pending
            pending = 0
        has_avg = (sw > 0).unsqueeze(-1)
        swc = sw.clamp_min(1e-300).unsqueeze(-1)
        xa = torch.where(has_avg, sx / swc, xe)
        ya = torch.where(has_avg, sy / swc, ye)
        Kxa = K.mv(xa)
        KTya = K.rmv(ya)
        cand = []
        for (xx, yy, kx, kty) in ((xe, ye, Kxe, KTye), (xa, ya, Kxa, KTya)):
            rp, rd, po, do = kkt_parts(xx * sc.dc, yy * sc.dr, kx / sc.dr, kty / sc.dc, oc, oq, orhs, olo, ohi, eq)
            nrp, nrd, gap = _norm(rp), _norm(rd), (po - do).abs()
            if mode == "optimize":
                ok = (nrp <= cfg.atol + cfg.rtol * bnorm) & (nrd <= cfg.atol + cfg.rtol * cnorm) & \
                     (gap <= cfg.atol + cfg.rtol * (po.abs() + do.abs()))
                rel = torch.maximum(torch.maximum(nrp / (1 + bnorm), nrd / (1 + cnorm)),
                                    gap / (1 + po.abs() + do.abs()))
            else:
                viol = rp.abs().amax(-1) if rp.shape[-1] else torch.zeros_like(po)
                assert feas_tol is not None
                ok = viol <= feas_tol
                rel = viol
            # scaled KKT error (restart potential)
            srp, srd, spo, sdo = kkt_parts(xx, yy, kx, kty, c, q, rhs, lo, hi, eq)
            phi = torch.sqrt(omega ** 2 * (srp * srp).sum(-1) + (srd * srd).sum(-1) / omega ** 2 + (spo - sdo) ** 2)
            fin = torch.isfinite(xx).all(-1) & torch.isfinite(yy).all(-1) & torch.isfinite(rel)
            cand.append((ok & fin, rel, phi, fin, (nrp, nrd, gap, po, do)))
        (ok_c, rel_c, phi_c, fin_c, st_c), (ok_a, rel_a, phi_a, fin_a, st_a) = cand
        use_avg = (ok_a & ~ok_c) | ((ok_a == ok_c) & (phi_a < phi_c) & has_avg.squeeze(-1))
        newly = active & (ok_c | ok_a)
        ua = use_avg.unsqueeze(-1)
        bx, by = torch.where(ua, xa, xe), torch.where(ua, ya, ye)
        brel = torch.where(use_avg, rel_a, rel_c)
        # record the best point for every still-active element (final answer if max_iter hits)
        nu1 = active.unsqueeze(-1)
        x_out, y_out = torch.where(nu1, bx, x_out), torch.where(nu1, by, y_out)
        res_out = torch.where(active, brel, res_out)
        for i, name in enumerate(("nrp", "nrd", "gap", "po", "do")):
            v = torch.where(use_avg, st_a[i], st_c[i])
            stats[name] = torch.where(active, v, stats[name]) if name in stats else v
        converged = converged | newly
        done_status = torch.where(newly, torch.zeros_like(done_status), done_status)
        nonfin = active & ~newly & ~(fin_c & fin_a)
        done_status = torch.where(nonfin, torch.full_like(done_status, int(Status.NONFINITE)), done_status)
        active = active & ~newly & ~nonfin
        if mode == "optimize" and not first_check:
            assert rays is not None
            rdx, rdKx, rdy, rdKTy = rays
            inf_p, inf_d = _infeasibility(sc, data, cfg, eq, [(rdy, rdKTy), (ye - y_c, KTye - KTy_c)],
                                          [(rdx, rdKx), (xe - x_c, Kxe - Kx_c)])
            inf_p, inf_d = inf_p & active, inf_d & active & ~inf_p
            done_status = torch.where(inf_p, torch.full_like(done_status, int(Status.INFEASIBLE)), done_status)
            done_status = torch.where(inf_d, torch.full_like(done_status, int(Status.UNBOUNDED)), done_status)
            active = active & ~inf_p & ~inf_d
        first_check = False
        rays = None
        if callback is not None:
            callback(it + 1, res_out)
        if check is not None and cfg.restart == "adaptive" and not last:
            if cfg.restart_to == "best":
                pick_avg = (phi_a < phi_c) & has_avg.squeeze(-1)
            else:
                pick_avg = has_avg.squeeze(-1) & (cfg.restart_to == "average")
            phi_cand = torch.where(pick_avg, phi_a, phi_c)
            do_r = (phi_cand <= cfg.beta_sufficient * phi_last) | \
                   ((phi_cand <= cfg.beta_necessary * phi_last) & (phi_cand > phi_prev)) | \
                   (since >= cfg.beta_artificial * total)
            do_r = do_r & active
            pa = pick_avg.unsqueeze(-1)
            rx, ry = torch.where(pa, xa, xe), torch.where(pa, ya, ye)
            rKx, rKTy = torch.where(pa, Kxa, Kxe), torch.where(pa, KTya, KTye)
            if cfg.primal_weight_update:
                ddx, ddy = _norm(rx - x_r), _norm(ry - y_r)
                okw = do_r & (ddx > 1e-10) & (ddy > 1e-10)
                th = cfg.primal_weight_smoothing
                new_w = torch.exp(th * torch.log(ddy.clamp_min(1e-300) / ddx.clamp_min(1e-300)) +
                                  (1 - th) * torch.log(omega))
                omega = torch.where(okw & torch.isfinite(new_w), new_w, omega)
            r1 = do_r.unsqueeze(-1)
            x, y = torch.where(r1, rx, x), torch.where(r1, ry, y)
            Kx, KTy = torch.where(r1, rKx, Kx), torch.where(r1, rKTy, KTy)
            xe, ye = torch.where(r1, rx, xe), torch.where(r1, ry, ye)
            Kxe, KTye = torch.where(r1, rKx, Kxe), torch.where(r1, rKTy, KTye)
            x_r, y_r = torch.where(r1, rx, x_r), torch.where(r1, ry, y_r)
            sx, sy = torch.where(r1, 0.0, sx), torch.where(r1, 0.0, sy)
            sw = torch.where(do_r, 0.0, sw)
            since = torch.where(do_r, 0.0, since)
            phi_last = torch.where(do_r, phi_cand, phi_last)
            phi_prev = torch.where(do_r, phi_cand, phi_prev)
            phi_prev = torch.where(~do_r & active, phi_cand, phi_prev)
            restarts = restarts + do_r.to(torch.int64)
        x_c, y_c, Kx_c, KTy_c = xe.clone(), ye.clone(), Kxe.clone(), KTye.clone()
        if check is not None and not bool(active.any()):
            break
        if scalar:
            omega_f = float(omega[0])
            scalar = bool(active.all())

    if pending:
        iters = iters + pending
    zeros = torch.zeros(B, dtype=dtype, device=x.device)
    return PDHGState(
        x=x_out * sc.dc, y=y_out * sc.dr, converged=converged, status=done_status, iterations=iters,
        residual=res_out, primal_residual=stats.get("nrp", zeros), dual_residual=stats.get("nrd", zeros),
        gap=stats.get("gap", zeros), primal_objective=stats.get("po", zeros), dual_objective=stats.get("do", zeros),
        polished=torch.zeros(B, dtype=torch.bool, device=x.device), restarts=restarts)


def _infeasibility(sc: _Scaled, data: LPData, cfg: PDHG, eq: Tensor, y_rays: list[tuple[Tensor, Tensor]],
                   x_rays: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Certificates of primal infeasibility (a dual ray) and dual infeasibility (a primal ray)."""
    tol = cfg.infeasibility_tol
    lo, hi = data.lower, data.upper
    lfin, ufin = torch.isfinite(lo), torch.isfinite(hi)
    lo0 = torch.where(lfin, lo, torch.zeros_like(lo))
    hi0 = torch.where(ufin, hi, torch.zeros_like(hi))
    prim = torch.zeros(data.B, dtype=torch.bool, device=lo.device)
    dual = torch.zeros_like(prim)
    for dy, dKTy in y_rays:
        yr = dy * sc.dr
        lam = -(dKTy / sc.dc)
        lam_pos = torch.where(lfin, lam.clamp_min(0), torch.zeros_like(lam))
        lam_neg = torch.where(ufin, (-lam).clamp_min(0), torch.zeros_like(lam))
        rd = (lam - lam_pos + lam_neg).abs().amax(-1) if lam.shape[-1] else lam.new_zeros(lam.shape[0])
        neg = torch.where(eq, torch.zeros_like(yr), (-yr).clamp_min(0))
        neg = neg.amax(-1) if neg.shape[-1] else torch.zeros_like(rd)
        obj = (data.rhs * yr).sum(-1) + (lo0 * lam_pos).sum(-1) - (hi0 * lam_neg).sum(-1)
        scale = yr.abs().amax(-1) if yr.shape[-1] else torch.zeros_like(rd)
        prim = prim | ((obj > 0) & (scale > 0) & (torch.maximum(rd, neg) <= tol * obj))
    for dx, dKx in x_rays:
        xr = dx * sc.dc
        kx = dKx / sc.dr
        viol_rows = torch.where(eq, kx.abs(), (-kx).clamp_min(0))
        vr = viol_rows.amax(-1) if viol_rows.shape[-1] else xr.new_zeros(xr.shape[0])
        vb = torch.where(lfin & ufin, xr.abs(), torch.zeros_like(xr))
        vb = torch.maximum(vb, torch.where(lfin & ~ufin, (-xr).clamp_min(0), torch.zeros_like(xr)))
        vb = torch.maximum(vb, torch.where(ufin & ~lfin, xr.clamp_min(0), torch.zeros_like(xr)))
        vb = torch.maximum(vb, (data.q * xr).abs()).amax(-1)
        obj = -(data.c * xr).sum(-1)
        dual = dual | ((obj > 0) & (torch.maximum(vr, vb) <= tol * obj))
    return prim, dual


def _polish(sc: _Scaled, data: LPData, cfg: PDHG, out: PDHGState, eq: Tensor) -> PDHGState:
    """Project converged ``x`` onto the feasible set (PDHG on ``min ½‖x' − x‖²``)."""
    sel = out.converged
    if not bool(sel.any()):
        return out
    x0 = out.x / sc.dc
    feas_tol = cfg.polish_tol * torch.clamp_min(data.rhs.abs().amax(-1) if data.m else data.c.new_zeros(data.B), 1.0)
    pcfg = dataclasses.replace(cfg, step="adaptive", restart="adaptive")
    pol = _loop(sc, data, pcfg, x0, torch.zeros_like(out.y), eq, mode="polish", callback=None,
                finite_in=sel.clone(), max_iter=cfg.polish_max_iter, feas_tol=feas_tol)
    good = sel & pol.converged
    g1 = good.unsqueeze(-1)
    x = torch.where(g1, pol.x, out.x)
    # recompute the statistics at the polished primal point with the optimal dual
    Kx = data.K.mv(x)
    KTy = data.K.rmv(out.y)
    rp, rd, po, do = kkt_parts(x, out.y, Kx, KTy, data.c, data.q, data.rhs, data.lower, data.upper, eq)
    nrp, nrd, gap = _norm(rp), _norm(rd), (po - do).abs()
    bn, cn = _norm(data.rhs), _norm(data.c)
    rel = torch.maximum(torch.maximum(nrp / (1 + bn), nrd / (1 + cn)), gap / (1 + po.abs() + do.abs()))
    pick = lambda new, old: torch.where(good, new, old)  # noqa: E731
    return dataclasses.replace(
        out, x=x, polished=good, residual=pick(rel, out.residual), primal_residual=pick(nrp, out.primal_residual),
        dual_residual=pick(nrd, out.dual_residual), gap=pick(gap, out.gap),
        primal_objective=pick(po, out.primal_objective),
        dual_objective=pick(do, out.dual_objective), iterations=out.iterations + torch.where(good, pol.iterations, 0))

r"""Batched dense QP solver: a primal-dual interior-point method on the homogeneous embedding.

Solves, for a batch of problems at once,

.. math::

    \min_x \tfrac12 x^\top Q x + p^\top x \quad\text{s.t.}\quad Ax = b,\; Gx \le h,
    \qquad Q \succeq 0,

by Mehrotra's predictor–corrector method applied to the homogeneous self-dual embedding of
the KKT conditions (the QP form of Goulart & Chen's Clarabel), with slack :math:`s = h - Gx`,
inequality dual :math:`\lambda \ge 0`, equality dual :math:`\nu`, and scalars
:math:`\tau, \kappa \ge 0`:

.. math::

    Qx + A^\top\nu + G^\top\lambda + p\tau = 0,\quad Ax - b\tau = 0,\quad Gx + s - h\tau = 0,\\
    \kappa + p^\top x + b^\top\nu + h^\top\lambda + x^\top Q x/\tau = 0,\quad
    s \circ \lambda = 0,\quad \tau\kappa = 0.

When :math:`\tau > 0` at the limit, :math:`(x, \nu, \lambda, s)/\tau` solves the QP. When
:math:`\tau \to 0` with :math:`\kappa > 0`, the iterates converge to a certificate:
:math:`(\nu, \lambda)` with :math:`A^\top\nu + G^\top\lambda = 0`,
:math:`b^\top\nu + h^\top\lambda < 0` proves the constraints infeasible (Farkas), and
:math:`x` with :math:`Qx = 0,\ Ax = 0,\ Gx \le 0,\ p^\top x < 0` proves the QP unbounded.
Both tests run per batch element every iteration, so an infeasible element is reported
(``Status.INFEASIBLE`` / ``Status.UNBOUNDED``) without holding back the others. Each
iteration makes **one** batched factorization of the KKT system (:mod:`.kkt`) and three
batched solves (two for the predictor, one for the corrector). With the convergence check on
(``check_every``), finished elements leave the working set at each check (the batch is
compacted), so the cost is proportional to the total number of element-iterations rather than
to ``batch × slowest element``; the check is one host synchronisation per iteration.

On CPU tensors (normal-equation form, no refinement, no callback, ``check_every`` set) the same
iteration runs as one compiled Numba call for the whole batch
(:mod:`optlayers.kernels.qp_ipm_numba`, kernel ``"qp.interior_point"``): each element's iterations
run one after the other in cache instead of as ~250 small batched tensor operations per
iteration, with the same iterates, iteration counts and statuses (solutions agree to ~1e-10 in
float64; in float32 rounding can move the stopping test by an iteration). The loop below is its
specification and runs everywhere else (``InteriorPoint(backend=...)`` or ``OPTLAYERS_KERNELS``
force either).

``Q`` need only be positive semidefinite (LPs have ``Q = 0``): the factorization carries a
small static regularization removed by iterative refinement, so a PSD ``Q`` with constraints
that make the solution unique is solved exactly; a non-unique solution is solved to an
(arbitrary) optimal point, and its gradient is then not defined.

References:
    Goulart & Chen, "Clarabel: An interior-point solver for conic programs with quadratic
    objectives", arXiv:2405.12762 (2024). Mehrotra, "On the implementation of a primal-dual
    interior point method", SIAM J. Optim. 2(4), 1992. Amos & Kolter, "OptNet: Differentiable
    optimization as a layer in neural networks", ICML 2017.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..._result import Result, Status, raise_if_failed, register_aux
from ...kernels import Backend, KernelUnavailableError, backend_available, dispatch, forced_backend
from ...kernels.qp_ipm import KERNEL_NAME
from ._data import QPData, prepare_qp
from .kkt import (
    SchurConstant,
    SchurFactor,
    bmtv,
    bmv,
    factor_kkt,
    factor_schur,
    kkt_constant,
    schur_constant,
    solve_any,
    solve_schur_ineq,
    stack_constraints,
    static_delta,
)

__all__ = ["InteriorPoint", "QPAux", "solve_qp", "warm_start_tensors"]


@register_aux
@dataclasses.dataclass(frozen=True)
class QPAux:
    r"""Dual solution and slack of a QP.

    At a solution of :math:`\min \tfrac12 x^\top Qx + p^\top x` s.t. :math:`Ax = b,\ Gx \le h`:
    :math:`Qx + p + A^\top\nu + G^\top\lambda = 0`, :math:`s = h - Gx \ge 0`,
    :math:`\lambda \ge 0` and :math:`\lambda \odot s = 0`.

    Attributes:
        ineq_dual: ``(*batch, m)`` multipliers ``λ ≥ 0`` of ``Gx ≤ h``.
        eq_dual: ``(*batch, p)`` multipliers ``ν`` of ``Ax = b``.
        slack: ``(*batch, m)`` the slack ``s = h - Gx ≥ 0``.

    Example:
        Both constraints of ``min ½‖x‖² − 1ᵀx s.t. x ≤ ½`` are active, with ``λ = 1 − x = ½``:

        >>> import torch
        >>> from optlayers.solvers.qp import solve_qp
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.full((2,), 0.5, dtype=torch.float64)
        >>> aux = solve_qp(Q, p, G, h).aux
        >>> aux.ineq_dual, aux.eq_dual.shape
        (tensor([0.5000, 0.5000], dtype=torch.float64), torch.Size([0]))
        >>> bool((aux.slack.abs() < 1e-9).all())
        True
    """

    ineq_dual: torch.Tensor
    eq_dual: torch.Tensor
    slack: torch.Tensor


def _tol(dtype: torch.dtype, value: float | None, f64: float, f32: float) -> float:
    if value is not None:
        return value
    return f64 if dtype == torch.float64 else f32


def _amax(v: torch.Tensor) -> torch.Tensor:
    """Per-element max-norm of ``(B, k)`` (0 when ``k == 0``)."""
    if v.shape[-1] == 0:
        return v.new_zeros(v.shape[:-1])
    return torch.linalg.vector_norm(v, ord=float("inf"), dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest ``α ≤ 1`` with ``v + α dv ≥ 0`` per element (``v > 0``; ``(B, k)`` with ``k ≥ 1``)."""
    # -dv/v is the rate at which each coordinate approaches 0; α = 1 / max rate.
    rate = (-dv / v).amax(-1)
    return 1.0 / rate.clamp_min(1.0)


@dataclasses.dataclass(frozen=True)
class InteriorPoint:
    r"""Configuration of the batched primal-dual interior-point QP solver.

    Stopping test (per batch element, on :math:`\bar x = x/\tau` etc.): the primal residual
    :math:`\max(\|A\bar x - b\|_\infty, \|G\bar x + \bar s - h\|_\infty)`, the dual residual
    :math:`\|Q\bar x + p + A^\top\bar\nu + G^\top\bar\lambda\|_\infty` and the gap
    :math:`\bar s^\top\bar\lambda`, each divided by the size of the terms it is made of
    (floored at ``atol / rtol``), must all be at most ``rtol``. ``Result.residual`` is the
    largest of the three ratios.

    Args:
        max_iter: Iteration limit (interior-point methods need 10–30 iterations).
        rtol: Relative tolerance; ``None`` means ``1e-12`` in float64 and ``1e-6`` in float32.
        atol: Absolute floor; ``None`` means ``1e-12`` in float64 and ``1e-6`` in float32.
        infeasibility_tol: A certificate of infeasibility (unboundedness) is accepted when its
            residual is at most this fraction of its objective (so no feasible point has
            ``‖x‖₁ < 1/infeasibility_tol``); ``None``: ``1e-9`` (float64) / ``1e-5`` (float32).
        regularization: Static regularization of the KKT factorization, relative to the data
            scale, removed by iterative refinement; ``None``: ``1e-8`` / ``1e-4``.
        refine: Iterative-refinement steps per KKT solve (the static regularization is small
            enough that unrefined Newton directions converge as fast; raise it for badly scaled data).
        step_fraction: Fraction of the step to the boundary of the cone (``0 < · < 1``).
        check_every: Test for convergence (a host synchronisation) every this many iterations
            and stop when every element is done; ``None`` runs exactly ``max_iter`` iterations
            without host synchronisation (elements still freeze once done).
        callback: Called as ``callback(iteration, residual)`` with the ``(B,)`` residuals.
        kkt_form: How each iteration solves the KKT system. ``"normal"``: the regularized
            normal equations of :func:`.kkt.factor_kkt` (an ``n × n`` Cholesky factorization of
            ``Q + Gᵀ W⁻¹ G + …`` per iteration; any PSD ``Q``, LPs included). ``"schur"``: the
            inequality Schur complement of :class:`.kkt.SchurConstant` (``K₀ = [[Q, Aᵀ], [A, 0]]``
            inverted once per solve, then an ``m × m`` Cholesky factorization of ``M + W`` per
            iteration and no ``n²m`` product); needs ``Q ≻ 0`` and ``A`` of full row rank, and
            falls back to ``"normal"`` when their condition number exceeds ``schur_max_cond``.
            ``"auto"``: the compiled normal-equation solve wherever it runs (see ``backend``; on
            CPU with ``B = 128`` it was 2.9× faster than the batched Schur form at
            ``n = 100, m = 20`` and ``n = 50, m = 20``, 1.6× at ``n = 200, m = 50``); otherwise
            ``"schur"`` in float64 when ``0 < m ≤ 3n/4`` (where the batched PyTorch loop is faster
            in that form: about 1.7× at ``n = 100, m = 20``; at ``m = n`` both forms cost the
            same, and at ``m = 2n`` the normal form is 1.7× faster), else ``"normal"``. In float32
            the Schur form reaches the tolerance with a less accurate solution (about 1e-4 against
            1e-5 relative on the benchmark problems), so ``"auto"`` keeps the normal form there, as
            it does without host synchronisation (``check_every=None``): choosing the form is one.
        schur_max_cond: Largest condition number of ``Q`` and ``A Q⁻¹ Aᵀ`` for the Schur form;
            ``None``: ``1e8`` (float64) / ``1e5`` (float32).
        backend: Which implementation runs the iterations. ``None`` (automatic): on CPU tensors,
            where the normal-equation form runs without refinement, callback or
            ``check_every=None``, the whole solve is one compiled Numba call per batch
            (:mod:`optlayers.kernels.qp_ipm_numba`: each element's iterations run in cache, the
            same iteration as the PyTorch loop, which is its specification); elsewhere, or with
            Numba missing, the batched PyTorch loop. ``OPTLAYERS_KERNELS`` overrides the automatic
            choice. ``"numba"`` forces the compiled solve (``kkt_form="auto"`` then means
            ``"normal"``) and raises :class:`~optlayers.kernels.KernelUnavailableError` where it
            cannot run (Numba missing, non-CPU tensors); ``"reference"`` forces the PyTorch loop.
            ``kkt_form="schur"`` always runs the PyTorch loop (the kernel has no Schur form).
            :func:`optlayers.kernels.last_backend` of ``"qp.interior_point"`` reports the
            compiled solve when it ran.
    Example:
        >>> import torch
        >>> from optlayers.solvers import solve_qp
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = 0.5 * torch.ones(2, dtype=torch.float64)
        >>> solve_qp(Q, p, G, h).solution
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    max_iter: int = 50
    rtol: float | None = None
    atol: float | None = None
    infeasibility_tol: float | None = None
    regularization: float | None = None
    refine: int = 0
    step_fraction: float = 0.99
    check_every: int | None = 1
    callback: Callable[[int, torch.Tensor], None] | None = None
    kkt_form: str = "auto"
    schur_max_cond: float | None = None
    backend: Backend | str | None = None

    def __post_init__(self) -> None:
        if self.kkt_form not in ("auto", "normal", "schur"):
            raise ValueError(f"kkt_form must be 'auto', 'normal' or 'schur', got {self.kkt_form!r}")
        if self.backend is not None:
            b = Backend.parse(self.backend)
            if b not in (Backend.REFERENCE, Backend.NUMBA):
                raise ValueError(f"backend must be 'reference', 'numba' or None, got {self.backend!r}")
            if b is Backend.NUMBA:
                why = [msg for bad, msg in ((self.kkt_form == "schur", "kkt_form='schur'"),
                                            (self.refine > 0, "refine > 0"),
                                            (self.callback is not None, "a callback"),
                                            (self.check_every is None, "check_every=None"))
                       if bad]
                if why:
                    raise ValueError(f"backend='numba' runs the normal-equation form without refinement, callback "
                                     f"or check_every=None; got {', '.join(why)} (use backend=None or 'reference')")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {self.max_iter!r}")
        for name in ("rtol", "atol", "infeasibility_tol", "regularization", "schur_max_cond"):
            v = getattr(self, name)
            if v is not None and not (v >= 0):
                raise ValueError(f"{name} must be nonnegative or None, got {v!r}")
        if not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"refine must be a nonnegative int, got {self.refine!r}")
        if not 0.0 < self.step_fraction < 1.0:
            raise ValueError(f"step_fraction must be in (0, 1), got {self.step_fraction!r}")
        if self.check_every is not None and (not isinstance(self.check_every, int) or self.check_every < 1):
            raise ValueError(f"check_every must be a positive int or None, got {self.check_every!r}")

    def tolerance(self, dtype: torch.dtype) -> float:
        """The relative tolerance in force for ``dtype``."""
        return _tol(dtype, self.rtol, 1e-12, 1e-6)

    def regularization_for(self, dtype: torch.dtype) -> float:
        """The relative static regularization in force for ``dtype``."""
        return _tol(dtype, self.regularization, 1e-8, 1e-4)

    # ------------------------------------------------------------------------------------
    def run(self, Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None,
            h: torch.Tensor | None = None, A: torch.Tensor | None = None,
            b: torch.Tensor | None = None, *, init: Result | torch.Tensor | None = None) -> Result[QPAux]:
        """Solve a batch of QPs (no autograd; see :func:`optlayers.layers.qp` for gradients).

        Args:
            Q: ``(*bQ, n, n)`` symmetric PSD.
            p: ``(*bp, n)``.
            G, h: ``(*bG, m, n)`` and ``(*bh, m)``, or None for no inequalities.
            A, b: ``(*bA, p, n)`` and ``(*bb, p)``, or None for no equalities.
            init: Warm start: a previous :class:`Result` of the same shapes (primal and duals
                are used) or a primal guess ``x0`` of shape ``(*batch, n)``.

        Returns:
            :class:`Result` with ``solution`` ``x`` of shape ``(*batch, n)`` and
            :class:`QPAux`; NaN where the element is infeasible, unbounded or non-finite.
        """
        data = prepare_qp(Q, p, G, h, A, b)
        with torch.no_grad():
            return self._run(data, init)

    def _run(self, d: QPData, init: Result | torch.Tensor | tuple | None,
             factor_out: list | None = None) -> Result[QPAux]:
        """The solve on flat-batched data (see :meth:`run`).

        With host synchronisation on (``check_every`` not None) the batch is *compacted*: at each
        convergence check the elements that are done leave the working set, so every later
        factorization and solve runs on the unfinished elements only.

        Args:
            d: The data.
            init: Warm start.
            factor_out: When a list, ``(H0, C, delta, sc, parts)`` is appended: the constant part of
                the reduced KKT matrix (:func:`.kkt.kkt_constant`), the stacked constraints, the
                static regularization and the :class:`.kkt.SchurConstant` of the whole batch (None
                when the normal-equation form ran), which the gradient's factorization reuses
                (:class:`.adjoint.KKTCache`); ``parts`` is None, or, when the compiled kernel ran,
                ``(L, d, ok)`` of the regularized factorization at the returned solution
                (:attr:`.kkt.KKTFactor.L`, ``.d``, ``.ok``), made in cache at the end of each
                element's solve, so the gradient does not form and factor it again.
        """
        dtype, device = d.Q.dtype, d.Q.device
        Bn, n, k, m = d.B, d.n, d.n_eq, d.n_ineq
        rtol = self.tolerance(dtype)
        atol = _tol(dtype, self.atol, 1e-12, 1e-6)
        eps_inf = _tol(dtype, self.infeasibility_tol, 1e-9, 1e-5)
        floor = atol / rtol if rtol > 0 else 0.0
        tiny = torch.finfo(dtype).tiny
        sync = self.check_every is not None
        Q, p = d.Q, d.p
        C = stack_constraints(d.A, d.G)  # (B|1, k+m, n): one matmul for both constraint blocks
        if d.b.shape[0] == d.h.shape[0]:
            bh = torch.cat([d.b, d.h], -1)  # (B|1, k+m)
        else:
            bh = torch.cat([d.b.expand(Bn, k), d.h.expand(Bn, m)], -1)

        def finite_rows(t: torch.Tensor) -> torch.Tensor:
            if not t.numel():
                return torch.ones(Bn, dtype=torch.bool, device=device)
            return torch.isfinite(t.reshape(t.shape[0], -1)).all(-1).expand(Bn)

        # "auto" prefers the compiled normal-equation solve wherever it runs: on the measured
        # problems it is 1.6–3× faster than the batched Schur form (see the class docstring).
        kernel = None if self.kkt_form == "schur" else self._kernel(d, C, bh)
        schur = kernel is None and bool(m) and (
            self.kkt_form == "schur"
            or (self.kkt_form == "auto" and sync and dtype == torch.float64 and 4 * m <= 3 * n))
        if kernel is None:
            finite = finite_rows(Q) & finite_rows(p) & finite_rows(C) & finite_rows(bh)
            A, G = d.A, d.G
            sc: SchurConstant | None = None
            if schur:
                sc = schur_constant(Q, A, G, _tol(dtype, self.schur_max_cond, 1e8, 1e5), valid=finite,
                                    reg=self.regularization_for(dtype))
                if sc is None and self.kkt_form == "schur":  # the normal-equation form after all
                    kernel = self._kernel(d, C, bh)
        if kernel is not None:
            # The compiled solve: per element, in cache, the same iteration as the loop below.
            out = kernel(Q, p, C, bh, k, self.regularization_for(dtype), Bn, self._warm_point(p, bh, d.G, k, Bn, init),
                         max_iter=self.max_iter, rtol=rtol, floor=floor, eps_inf=eps_inf,
                         step_fraction=self.step_fraction, factor=factor_out is not None, constant=False)
            x, yc, s, tau, kappa, status, iterations, residual, _, delta = out[:10]
            if factor_out is not None:
                # The kernel's factorization at the solution replaces H0 (not returned: constant=False).
                factor_out.append((None, C, delta, None, out[10:]))
            return self._finish(d, x, yc, s, tau, status, iterations, residual)
        delta = static_delta(Q, d.A, d.G, Bn, self.regularization_for(dtype))  # (B, 1)
        H0 = kkt_constant(Q, d.A, delta)
        Gt = G.transpose(-1, -2)
        norm_p = _amax(p).expand(Bn)
        norm_bh = _amax(bh).expand(Bn)

        x, yc, s, tau, kappa = self._initial_point(Q, p, C, bh, A, G, k, Bn, delta, H0, init, sc)

        done = ~finite
        status = torch.where(finite, torch.full((Bn,), int(Status.MAX_ITER), dtype=torch.int64, device=device),
                             torch.full((Bn,), int(Status.NONFINITE), dtype=torch.int64, device=device))
        iterations = torch.zeros(Bn, dtype=torch.int64, device=device)
        residual = torch.full((Bn,), float("inf"), dtype=dtype, device=device)
        small_steps = torch.zeros(Bn, dtype=torch.int64, device=device)
        # Full-batch copies of the state; the loop works on the rows `idx` (all rows until the
        # first compaction) and writes rows back when they leave the working set.
        full = {"x": x, "yc": yc, "s": s, "tau": tau, "kappa": kappa, "status": status,
                "iterations": iterations, "residual": residual}
        idx: torch.Tensor | None = None  # None: the working set is the whole batch
        if factor_out is not None:
            factor_out.append((H0, C, delta, sc, None))
        flushed = False

        def rows(t: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
            """Working rows of batched data (shared data, leading dimension 1, is kept)."""
            return t if t.shape[0] == 1 else t[sel]

        for it in range(self.max_iter + 1):
            Bw = x.shape[0]
            z = yc[:, k:]
            # ---- residuals of the embedding -------------------------------------------------
            Qx, Cty, Cx = bmv(Q, x), bmtv(C, yc), bmv(C, x)
            tc = tau.unsqueeze(-1)
            rx = Qx + Cty + p * tc
            rc = Cx - bh * tc
            rc[:, k:] += s
            xQx = _dot(x, Qx)
            px, bhy = _dot(p, x), _dot(bh, yc)
            rtau = kappa + px + bhy + xQx / tau
            # ---- convergence on the unscaled point (x/τ, y/τ, s/τ) -----------------------------
            n_Qx, n_Cty, n_Cx = _amax(Qx), _amax(Cty), _amax(Cx)
            pres = _amax(rc)
            pscale = torch.maximum(torch.maximum(n_Cx, _amax(s)), norm_bh * tau)
            dres = _amax(rx)
            dscale = torch.maximum(torch.maximum(n_Qx, n_Cty), norm_p * tau)
            t2 = tau * tau
            gap = _dot(s, z)
            obj_scale = torch.maximum((0.5 * xQx + px * tau).abs(), (0.5 * xQx + bhy * tau).abs())
            fl = floor * tau
            res_now = torch.stack([pres / torch.maximum(pscale, fl), dres / torch.maximum(dscale, fl),
                                   gap.abs() / torch.maximum(obj_scale, floor * t2)]).amax(0)
            res_now = torch.nan_to_num(res_now, nan=float("inf"))
            residual = torch.where(done, residual, res_now)
            conv_now = ~done & (res_now <= rtol)
            # ---- infeasibility certificates (only once κ > τ somewhere) -------------------------
            kt = ~done & ~conv_now & (kappa > tau)
            pinf = dinf = torch.zeros_like(done)
            if not sync or bool(kt.any()):
                nyz = _amax(yc).clamp_min(tiny)
                cp = -bhy / nyz
                pinf = kt & (cp > eps_inf * norm_bh) & (n_Cty / nyz <= eps_inf * cp)
                nx = _amax(x).clamp_min(tiny)
                cd = -px / nx
                viol = torch.maximum(_amax(Cx[:, :k]), _amax(Cx[:, k:].clamp_min(0.0)))
                rd = torch.maximum(n_Qx, viol) / nx
                dinf = kt & ~pinf & (cd > eps_inf * norm_p) & (rd <= eps_inf * cd)
            bad = ~done & ~(torch.isfinite(res_now) | conv_now) & ~torch.isfinite(rtau)
            stalled = ~done & ~conv_now & (small_steps >= 5)
            new = torch.where(conv_now, 0, torch.where(pinf, int(Status.INFEASIBLE), torch.where(
                dinf, int(Status.UNBOUNDED), torch.where(bad, int(Status.NONFINITE), int(Status.STAGNATION)))))
            now_done = conv_now | pinf | dinf | bad | stalled
            status = torch.where(now_done, new, status)
            done = done | now_done
            if self.callback is not None:
                self.callback(it, residual if idx is None else full["residual"].index_copy(0, idx, residual))
            last = it == self.max_iter
            if sync and (it % self.check_every == 0 or last):  # type: ignore[operator]
                n_active = Bw - int(done.sum())  # the one host synchronisation of the iteration
                if n_active < Bw or last:
                    # Compaction: rows that are done leave the working set.
                    leave = done if not last else torch.ones_like(done)
                    sel = torch.nonzero(leave).squeeze(-1)
                    gidx = sel if idx is None else idx[sel]
                    for key, v in (("x", x), ("yc", yc), ("s", s), ("tau", tau), ("kappa", kappa),
                                   ("status", status), ("iterations", iterations), ("residual", residual)):
                        full[key] = full[key].index_copy(0, gidx, v[sel])
                    if n_active == 0 or last:
                        flushed = True
                        break
                    kp = torch.nonzero(~done).squeeze(-1)
                    idx = kp if idx is None else idx[kp]
                    x, yc, s, tau, kappa = x[kp], yc[kp], s[kp], tau[kp], kappa[kp]
                    status, iterations, residual = status[kp], iterations[kp], residual[kp]
                    small_steps, done = small_steps[kp], done[kp]
                    c_batched = C.shape[0] != 1
                    Q, p, C, bh = (rows(t, kp) for t in (Q, p, C, bh))
                    if c_batched:  # A and G as views of the gathered C: no further copies
                        A, G = C[:, :k], C[:, k:]
                        Gt = G.transpose(-1, -2)
                    delta, H0 = rows(delta, kp), rows(H0, kp)
                    if sc is not None:
                        sc = sc.rows(kp)
                    norm_p, norm_bh = norm_p[kp], norm_bh[kp]
                    Bw = n_active
                    z = yc[:, k:]
                    Qx, Cty, Cx, rx, rc = Qx[kp], Cty[kp], Cx[kp], rx[kp], rc[kp]
                    tc, xQx, t2, rtau = tc[kp], xQx[kp], t2[kp], rtau[kp]
            elif last:
                break
            active = ~done
            iterations = iterations + active.to(torch.int64)

            # ---- Newton step (Mehrotra predictor-corrector) ---------------------------------
            mu = (_dot(s, z) + tau * kappa) / (m + 1)
            f = (factor_kkt(Q, A, G, s / z, delta, retry=sync, H0=H0, C=C, Gt=Gt) if sc is None
                 else factor_schur(sc, s / z, retry=sync))
            c_x = p + (2.0 / tc) * Qx
            xiQxi = xQx / t2
            k_t = kappa / tau
            # Two right-hand sides in one solve: [-p; b; h] and the affine direction.
            rhs_c = torch.stack([bh.expand(Bw, k + m), -rc], -1)
            rhs_c[:, k:, 1] += s
            ux, uc = solve_any(f, torch.stack([-p.expand(Bw, n), -rx], -1), rhs_c, refine=self.refine)
            u1x, u1c = ux[..., 0], uc[..., 0]
            denom = _dot(c_x, u1x) + _dot(bh, u1c) - xiQxi - k_t
            denom = torch.where(denom < 0, denom, -torch.ones_like(denom))  # < 0 in exact arithmetic

            def direction(u2x: torch.Tensor, u2c: torch.Tensor, eta: torch.Tensor | float,
                          d_s: torch.Tensor, d_k: torch.Tensor) -> tuple[torch.Tensor, ...]:
                dt = (-eta * rtau - d_k / tau - _dot(c_x, u2x) - _dot(bh, u2c)) / denom
                dtc = dt.unsqueeze(-1)
                dx, dyc = u2x + dtc * u1x, u2c + dtc * u1c
                dz = dyc[:, k:]
                return dx, dyc, (d_s - s * dz) / z, dt, (d_k - kappa * dt) / tau

            cone = torch.cat([s, z, tau.unsqueeze(-1), kappa.unsqueeze(-1)], -1)
            d_s = -s * z
            dxa, dyca, dsa, dta, dka = direction(ux[..., 1], uc[..., 1], 1.0, d_s, -tau * kappa)
            step_a = torch.cat([dsa, dyca[:, k:], dta.unsqueeze(-1), dka.unsqueeze(-1)], -1)
            alpha_a = _max_step(cone, step_a).unsqueeze(-1)
            mu_a = _dot(cone[:, :m] + alpha_a * dsa, z + alpha_a * dyca[:, k:])
            mu_a = (mu_a + (tau + alpha_a[:, 0] * dta) * (kappa + alpha_a[:, 0] * dka)) / (m + 1)
            sigma = (mu_a / mu.clamp_min(tiny)).clamp(0.0, 1.0) ** 3
            eta = 1.0 - sigma
            smu = sigma * mu
            d_s = d_s + smu.unsqueeze(-1) - dsa * dyca[:, k:]
            d_k = -tau * kappa + smu - dta * dka
            if isinstance(f, SchurFactor):
                # By linearity, K⁻¹[-η r; -η r_c - d_s/z] = η·(affine solve) + K⁻¹[0; -η s - d_s/z],
                # and the second solve skips the products with K₀⁻¹.
                cx, cc = solve_schur_ineq(f, (-eta.unsqueeze(-1) * s - d_s / z).unsqueeze(-1))
                cx, cc = cx + eta[:, None, None] * ux[..., 1:], cc + eta[:, None, None] * uc[..., 1:]
            else:
                rc2 = -eta.unsqueeze(-1) * rc
                rc2[:, k:] -= d_s / z
                cx, cc = solve_any(f, (-eta.unsqueeze(-1) * rx).unsqueeze(-1), rc2.unsqueeze(-1),
                                   refine=self.refine)
            dx, dyc, ds, dt, dk = direction(cx[..., 0], cc[..., 0], eta, d_s, d_k)
            alpha = self.step_fraction * _max_step(cone, torch.cat([ds, dyc[:, k:], dt.unsqueeze(-1),
                                                                    dk.unsqueeze(-1)], -1))
            ok_step = active & f.ok & torch.isfinite(alpha)
            alpha = torch.where(ok_step, alpha, torch.zeros_like(alpha))
            small_steps = torch.where(active & (alpha < 1e-8), small_steps + 1, torch.zeros_like(small_steps))
            a = alpha.unsqueeze(-1)
            if sync and bool(ok_step.all()):
                x, yc, s = x + a * dx, yc + a * dyc, s + a * ds
                tau, kappa = tau + alpha * dt, kappa + alpha * dk
            else:
                upd = ok_step.unsqueeze(-1)
                x = torch.where(upd, x + a * dx, x)
                yc = torch.where(upd, yc + a * dyc, yc)
                s = torch.where(upd, s + a * ds, s)
                tau = torch.where(ok_step, tau + alpha * dt, tau)
                kappa = torch.where(ok_step, kappa + alpha * dk, kappa)

        if not flushed:  # the loop ended without a final compaction (no host synchronisation)
            full = {"x": x, "yc": yc, "s": s, "tau": tau, "kappa": kappa, "status": status,
                    "iterations": iterations, "residual": residual}
        return self._finish(d, full["x"], full["yc"], full["s"], full["tau"], full["status"], full["iterations"],
                            full["residual"])

    def _kernel(self, d: QPData, C: torch.Tensor, bh: torch.Tensor) -> Callable[..., tuple[torch.Tensor, ...]] | None:
        """The compiled whole-solve kernel where it is chosen and applies, else None (PyTorch loop)."""
        forced = Backend.parse(self.backend) if self.backend is not None else forced_backend()
        if forced is not None and forced is not Backend.NUMBA:
            return None
        explicit = self.backend is not None
        if not explicit and (self.refine or self.callback is not None or self.check_every is None):
            return None  # configurations the kernel does not implement (an explicit backend was validated)
        tensors = (d.Q, d.p, C, bh)
        if not explicit and forced is None:
            if d.Q.device.type != "cpu" or not backend_available(Backend.NUMBA):
                return None
        if d.Q.dtype not in (torch.float32, torch.float64) or any(
                torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
            if explicit:
                raise KernelUnavailableError(
                    f"backend='numba' was forced for InteriorPoint but the data are {d.Q.dtype} or wrapped by a "
                    "torch.func transform; use backend=None")
            return None
        size = d.B * (d.n + d.n_eq + d.n_ineq) * d.n
        if forced is None:
            try:
                fn = dispatch(KERNEL_NAME, device=d.Q.device, size=size)
            except KernelUnavailableError:
                return None
            return fn if getattr(fn, "backend", None) is Backend.NUMBA else None
        return dispatch(KERNEL_NAME, backend=self.backend, device=d.Q.device, size=size)

    def _finish(self, d: QPData, x: torch.Tensor, yc: torch.Tensor, s: torch.Tensor, tau: torch.Tensor,
                status: torch.Tensor, iterations: torch.Tensor, residual: torch.Tensor) -> Result[QPAux]:
        """The :class:`Result` of the embedding's final point (divided by ``τ``; NaN where failed)."""
        dtype, device, k = x.dtype, x.device, d.n_eq
        converged = status == int(Status.SUCCESS)
        invalid = ((status == int(Status.INFEASIBLE)) | (status == int(Status.UNBOUNDED))
                   | (status == int(Status.NONFINITE)))
        nan = torch.tensor(float("nan"), dtype=dtype, device=device)

        def finish(v: torch.Tensor) -> torch.Tensor:
            v = torch.where(invalid.unsqueeze(-1), nan, v / tau.unsqueeze(-1))
            return v.reshape(d.batch_shape + v.shape[-1:])

        bs = d.batch_shape
        return Result(solution=finish(x), converged=converged.reshape(bs), iterations=iterations.reshape(bs),
                      residual=residual.reshape(bs), status=status.reshape(bs),
                      aux=QPAux(ineq_dual=finish(yc[:, k:]), eq_dual=finish(yc[:, :k]), slack=finish(s)))

    def _initial_point(self, Q: torch.Tensor, p: torch.Tensor, C: torch.Tensor, bh: torch.Tensor,
                       A: torch.Tensor, G: torch.Tensor, k: int, Bn: int, delta: torch.Tensor, H0: torch.Tensor,
                       init: Result | torch.Tensor | tuple | None,
                       sc: SchurConstant | None = None) -> tuple[torch.Tensor, ...]:
        dtype, device = Q.dtype, Q.device
        n, m = p.shape[-1], G.shape[-2]
        warm = self._warm_point(p, bh, G, k, Bn, init)
        if warm is not None:
            return warm
        one = torch.ones(Bn, dtype=dtype, device=device)
        # Cold start: solve K(W = I) [x; y; z] = [-p; b; h], then shift (s, z) into the cone.
        ones = torch.ones(Bn, m, dtype=dtype, device=device)
        retry = self.check_every is not None
        f = (factor_kkt(Q, A, G, ones, delta, retry=retry, H0=H0, C=C) if sc is None
             else factor_schur(sc, ones, retry=retry))
        x, yc = solve_any(f, -p.expand(Bn, n).unsqueeze(-1), bh.expand(Bn, bh.shape[-1]).unsqueeze(-1),
                            refine=self.refine)
        x, yc = x[..., 0], yc[..., 0]
        zz = yc[:, k:]
        s, z = -zz, zz
        if m:
            ap = (-s).amax(-1, keepdim=True)
            s = torch.where(ap >= 0, s + 1.0 + ap, s)
            ad = (-z).amax(-1, keepdim=True)
            z = torch.where(ad >= 0, z + 1.0 + ad, z)
        return x, torch.cat([yc[:, :k], z], -1), s, one.clone(), one.clone()

    def _warm_point(self, p: torch.Tensor, bh: torch.Tensor, G: torch.Tensor, k: int, Bn: int,
                    init: Result | torch.Tensor | tuple | None) -> tuple[torch.Tensor, ...] | None:
        """The warm-start point ``(x, yc, s, τ, κ)`` from ``init``, or None (cold start)."""
        dtype, device = p.dtype, p.device
        n, m = p.shape[-1], G.shape[-2]
        x0, y0, z0 = warm_start_tensors(init)
        if x0 is None:
            return None
        x = x0.to(dtype).reshape(-1, n).expand(Bn, n).clone()
        y = (y0.to(dtype).reshape(-1, k).expand(Bn, k) if y0 is not None and k > 0
             else torch.zeros(Bn, k, dtype=dtype, device=device))
        sl = (bh[..., k:] - bmv(G, x)).expand(Bn, m)
        s = torch.maximum(sl, 1e-2 * (1.0 + _amax(sl)).unsqueeze(-1))
        if z0 is not None and m > 0:
            zf = z0.to(dtype).reshape(-1, m).expand(Bn, m)
            z = torch.maximum(zf, 1e-2 * (1.0 + _amax(zf)).unsqueeze(-1))
        else:
            z = torch.ones(Bn, m, dtype=dtype, device=device)
        yc = torch.cat([y, z], -1)
        if not bool(torch.isfinite(x).all() & torch.isfinite(yc).all()):
            return None
        one = torch.ones(Bn, dtype=dtype, device=device)
        return x, yc, s, one, one.clone()


def warm_start_tensors(init: Result | torch.Tensor | tuple | None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(x0, eq_dual0, ineq_dual0)`` (detached, None where absent) from a warm start.

    Accepts a previous :class:`Result` with :class:`QPAux`, a primal tensor ``x0``, a tuple
    ``(x0, eq_dual0, ineq_dual0)`` or None.

    Example:
        >>> import torch
        >>> from optlayers.solvers.qp import solve_qp
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.full((2,), 0.5, dtype=torch.float64)
        >>> res = solve_qp(Q, p, G, h)
        >>> x0, nu0, lam0 = warm_start_tensors(res)
        >>> x0, nu0.shape
        (tensor([0.5000, 0.5000], dtype=torch.float64), torch.Size([0]))
        >>> lam0
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> warm_start_tensors(torch.zeros(2))
        (tensor([0., 0.]), None, None)
    """
    if init is None:
        return (None, None, None)
    if isinstance(init, Result):
        aux = init.aux
        if aux is not None and not isinstance(aux, QPAux):
            raise TypeError(f"init must be a Result of a QP solve (aux QPAux), got aux {type(aux).__name__}")
        return (init.solution.detach(), None if aux is None else aux.eq_dual.detach(),
                None if aux is None else aux.ineq_dual.detach())
    if isinstance(init, torch.Tensor):
        return (init.detach(), None, None)
    if isinstance(init, tuple) and len(init) == 3:
        return tuple(None if t is None else t.detach() for t in init)  # type: ignore[return-value]
    raise TypeError(f"init must be a Result of a previous QP solve, a tensor x0 or a tuple, got {type(init).__name__}")


def solve_qp(Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
             A: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
             solver: InteriorPoint | None = None, init: Result | torch.Tensor | None = None,
             throw: bool = True) -> Result[QPAux]:
    r"""Solve a batch of QPs ``min ½xᵀQx + pᵀx s.t. Ax = b, Gx ≤ h`` (forward only).

    .. math::

        x^\star = \operatorname*{argmin}_x \tfrac12 x^\top Q x + p^\top x
        \quad\text{s.t.}\quad Ax = b,\; Gx \le h, \qquad Q \succeq 0,

    by the interior point of :class:`InteriorPoint` (stopping test in its docstring).

    A thin wrapper of :meth:`InteriorPoint.run` that raises on failure. It records no
    gradient; use :func:`optlayers.layers.qp` to differentiate the solution.

    Args:
        Q, p, G, h, A, b: The data, each shared or batched (leading dimensions broadcast).
        solver: The :class:`InteriorPoint` configuration (default settings when None).
        init: Warm start (see :meth:`InteriorPoint.run`).
        throw: Raise :class:`~optlayers.ConvergenceError` when an element fails (naming the
            status — e.g. ``INFEASIBLE`` — and the failing batch indices).

    Returns:
        :class:`Result` with solution ``x`` and :class:`QPAux`.

    Raises:
        ConvergenceError: With ``throw=True``, when an element fails.

    Example:
        The projection of ``(1, 1)`` onto ``{x ≤ ½, x₁ + x₂ = ½}``, for a batch of two right-hand
        sides, then warm-started from that result:

        >>> import torch
        >>> from optlayers.solvers.qp import solve_qp
        >>> Q = torch.eye(2, dtype=torch.float64); p = -torch.ones(2, dtype=torch.float64)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.full((2,), 0.5, dtype=torch.float64)
        >>> A = torch.ones(1, 2, dtype=torch.float64); b = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
        >>> res = solve_qp(Q, p, G, h, A, b)
        >>> res.solution, bool(res.converged.all())
        (tensor([[0.2500, 0.2500],
                [0.5000, 0.5000]], dtype=torch.float64), True)
        >>> warm = solve_qp(Q, p, G, h, A, b, init=res)
        >>> torch.allclose(warm.solution, res.solution), bool((warm.iterations <= res.iterations).all())
        (True, True)
    """
    cfg = solver if solver is not None else InteriorPoint()
    res = cfg.run(Q, p, G, h, A, b, init=init)
    return raise_if_failed("InteriorPoint", res, throw, tol=cfg.tolerance(Q.dtype), max_iter=cfg.max_iter)

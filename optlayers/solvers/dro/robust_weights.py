r"""``robust_weights(losses, spec)``: worst-case weights of a distributionally robust loss.

For losses :math:`\ell \in \mathbb{R}^{\dots\times n}` and an uncertainty set ``spec`` (see
:mod:`optlayers.solvers.dro._specs` for the conventions), returns a
:class:`~optlayers.Result` whose ``solution`` is the maximiser :math:`p^\star` over the last
dimension and whose ``aux`` is a :class:`DROAux`: the robust value (differentiable),
the dual variables and the divergence of :math:`p^\star`.

Gradient (Danskin): the robust value is returned as
:math:`\langle \mathrm{sg}(p^\star), \ell\rangle - \mathrm{sg}(\lambda D(p^\star))`
(``sg`` = stop-gradient), so autograd gives :math:`\partial R/\partial\ell = p^\star`, which is
the gradient wherever the maximiser is unique (all penalised and ball sets with non-constant
losses) and a valid subgradient otherwise. The weights themselves carry no gradient.

Transforms: under ``torch.func`` the solve runs as one function with a ``vmap`` rule (the
vmapped dimension becomes a leading batch dimension of a single solve, since the solvers branch
on the data), so ``vmap``, ``grad``, ``jacrev``, ``jacfwd`` and their compositions work, as
does forward-mode AD; compiled kernels then give way to the PyTorch reference.

Exactness: CVaR, TV, :math:`\chi^2` ball/penalty, KL penalty and spectral risk (+ penalty) are
closed forms (sort, selection, simplex projection, logsumexp, PAV) with no tolerance.
KL ball, Cressie–Read, KL-smoothed CVaR and holistic robustness need a 1-D root-find:
safeguarded Newton–bisection in float64 with tolerance ``tol`` (default ``1e-12`` for float64
losses, ``1e-7`` otherwise) and ``max_iter`` (default 100); their weights are always feasible
(the feasible end of the final bracket, normalised). All inner computations run in float64;
weights are returned in the dtype of ``losses``.

Dual variables (``aux.dual``), ``eta`` then ``lam``:

* CVaR: the VaR :math:`\tau` (the :math:`\lceil\alpha n\rceil`-th largest loss), 0. Smoothed:
  :math:`\eta` with :math:`p_i \propto \min(e^{(\ell_i-\eta)/s-1}, 1/\alpha)`, and :math:`s`.
* TotalVariation: the VaR of the CVaR part, 0.
* chi-square: the threshold with :math:`p = (\ell-\eta)_+/(2\mu n)`, and the total multiplier
  :math:`\mu` of the divergence (penalty + ball multiplier).
* KL: :math:`\eta` with :math:`p = e^{(\ell-\eta)/\lambda}/n`, and :math:`\lambda` (the
  penalty, or the ball's multiplier).
* CressieRead: :math:`\eta, \lambda` of
  :math:`\eta + \lambda\rho + \lambda\,\mathrm{mean}_i f_k^*((\ell_i-\eta)/\lambda)`.
* Spectral: NaN, :math:`\lambda`.
* HolisticRobust: :math:`\eta^\star` and :math:`\lambda` with
  :math:`p_i = \lambda q_i/(\eta^\star - v_i)`.

:func:`dual_value` evaluates the dual objective at given dual variables; it upper-bounds the
robust value for any feasible duals (a certificate) and equals it at the optimum.

Example:
    >>> import torch
    >>> from optlayers.solvers.dro import robust_weights, CVaR
    >>> res = robust_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), CVaR(0.5))
    >>> res.solution.tolist(), float(res.aux.value)
    ([0.0, 0.0, 0.5, 0.5], 3.5)

References:
    Rockafellar & Uryasev (2000); Duchi & Namkoong (2021), "Learning models with uniform
    performance via distributionally robust optimization"; Levy et al. (NeurIPS 2020);
    Mehta et al. (ICLR 2024); Bennouna, Lucas & Van Parys (2023).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from ..._result import Result, Status, raise_if_failed, register_aux
from ...kernels import Backend
from ._common import Solved
from ._specs import (
    ChiSquareBall,
    ChiSquarePenalty,
    CressieRead,
    CVaR,
    DROSpec,
    HolisticRobust,
    KLBall,
    KLPenalty,
    Spectral,
    TotalVariation,
)
from .chi_square import solve_chi2_ball, solve_chi2_penalty
from .cressie_read import solve_cressie_read
from .cvar import solve_cvar, solve_cvar_smoothed, solve_total_variation
from .holistic import holistic_poisoned_weights, solve_holistic
from .kl import solve_kl_ball, solve_kl_penalty
from .spectral import solve_spectral

__all__ = ["DRODual", "DROAux", "robust_weights", "dual_value", "solve_flat"]


@register_aux
@dataclasses.dataclass(frozen=True)
class DRODual:
    r"""Dual variables of the inner problem (batch shape); see the module table.

    ``eta`` is the threshold or normaliser :math:`\eta` and ``lam`` the multiplier
    :math:`\lambda` of the divergence; for CVaR, say, :math:`\eta` is the VaR and
    :math:`\mathrm{CVaR}_\alpha(\ell) = \eta + \frac{1}{\alpha n}\sum_i(\ell_i-\eta)_+`.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import CVaR, KLPenalty, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> dual = robust_weights(losses, CVaR(0.5)).aux.dual
        >>> float(dual.eta), float(dual.lam)
        (3.0, 0.0)
        >>> res = robust_weights(losses, KLPenalty(0.5))  # p = exp((l - eta) / lam) / n
        >>> eta, lam = res.aux.dual.eta, res.aux.dual.lam
        >>> float(lam), torch.allclose(res.solution, torch.exp((losses - eta) / lam) / 4)
        (0.5, True)
    """

    eta: Tensor
    lam: Tensor


@register_aux
@dataclasses.dataclass(frozen=True)
class DROAux:
    r"""Extras of :func:`robust_weights`.

    ``value`` is :math:`R(\ell) = \langle p^\star, \ell\rangle - \lambda D(p^\star)`, whose
    gradient in :math:`\ell` is :math:`p^\star` (Danskin).

    Attributes:
        value: Robust value, batch shape, differentiable w.r.t. the losses (Danskin).
        dual: :class:`DRODual`.
        divergence: Divergence of the weights from uniform in the spec's own measure (CVaR:
            :math:`\max_i np_i`; TV: :math:`\frac12\|p-u\|_1`; HR: :math:`\mathrm{KL}(q\|p)`).

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import CVaR, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
        >>> aux = robust_weights(losses, CVaR(0.5)).aux
        >>> float(aux.value.detach()), float(aux.divergence)  # max_i n p_i = 4 * 0.5
        (3.5, 2.0)
        >>> aux.value.backward()
        >>> losses.grad.tolist()
        [0.0, 0.0, 0.5, 0.5]
    """

    value: Tensor
    dual: DRODual
    divergence: Tensor


def _default_tol(dtype: torch.dtype, tol: float | None) -> float:
    if tol is not None:
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be positive and finite, got {tol}")
        return float(tol)
    return 1e-12 if dtype == torch.float64 else 1e-7


def solve_flat(L: Tensor, spec: DROSpec, *, tol: float, max_iter: int,
               backend: Backend | str | None = None) -> Solved:
    """Dispatch a finite float64 ``(B, n)`` batch to the solver of ``spec``."""
    if isinstance(spec, CVaR):
        if spec.smoothing > 0:
            return solve_cvar_smoothed(L, spec.alpha, spec.smoothing, tol=tol, max_iter=max_iter)
        return solve_cvar(L, spec.alpha, backend=backend)
    if isinstance(spec, TotalVariation):
        return solve_total_variation(L, spec.eps, backend=backend)
    if isinstance(spec, ChiSquareBall):
        return solve_chi2_ball(L, spec.rho, spec.lam, backend=backend)
    if isinstance(spec, ChiSquarePenalty):
        return solve_chi2_penalty(L, spec.lam)
    if isinstance(spec, KLBall):
        return solve_kl_ball(L, spec.rho, tol=tol, max_iter=max_iter, backend=backend)
    if isinstance(spec, KLPenalty):
        return solve_kl_penalty(L, spec.lam, optimistic=spec.optimistic)
    if isinstance(spec, CressieRead):
        return solve_cressie_read(L, spec.k, rho=spec.rho, lam=spec.lam, tol=tol, max_iter=max_iter,
                                  backend=backend)
    if isinstance(spec, Spectral):
        return solve_spectral(L, spec, backend=backend)
    if isinstance(spec, HolisticRobust):
        return solve_holistic(L, spec.alpha, spec.r, tol=tol, max_iter=max_iter, backend=backend)
    raise TypeError(
        f"unknown DRO spec {type(spec).__name__}; expected one of CVaR, TotalVariation, "
        "ChiSquareBall, ChiSquarePenalty, KLBall, KLPenalty, CressieRead, Spectral, HolisticRobust")


def _check_losses(losses: object) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"losses must be a floating-point tensor, got {losses.dtype}")
    if losses.dim() == 0 or losses.shape[-1] == 0:
        raise ValueError(f"losses must have at least one element along the last dimension, got shape "
                         f"{tuple(losses.shape)}")
    return losses


def robust_weights(losses: Tensor, spec: DROSpec, *, tol: float | None = None, max_iter: int = 100,
                   backend: Backend | str | None = None, throw: bool = True) -> Result[DROAux]:
    r"""Worst-case weights over the last dimension of ``losses`` for the uncertainty set ``spec``.

    For each row :math:`\ell \in \mathbb{R}^n` of ``losses``,

    .. math:: p^\star = \operatorname*{arg\,max}_{p \in \mathcal U} \langle p, \ell\rangle - \lambda D(p),
              \qquad R(\ell) = \langle p^\star, \ell\rangle - \lambda D(p^\star),
              \qquad \nabla_\ell R = p^\star,

    with :math:`\mathcal U \subseteq \Delta_n` and :math:`\lambda D` given by ``spec`` (see the
    module docstring for the exactness, duals and tolerances of each spec).

    Args:
        losses: ``(*batch, n)`` floating tensor (any device); each row is one problem.
        spec: An uncertainty-set config (``CVaR(0.1)``, ``ChiSquareBall(1.0)``, ...).
        tol: Tolerance of the 1-D root-finds (default ``1e-12`` for float64, ``1e-7`` otherwise);
            unused by the exact specs.
        max_iter: Iteration limit of the root-finds.
        backend: Force a kernel backend for the sort-based kernels (``"reference"``,
            ``"numba"``); default: automatic (see :mod:`optlayers.kernels`).
        throw: Raise :class:`~optlayers.ConvergenceError` if a row fails (non-finite losses, a
            root-find that did not converge). With ``False`` read ``converged``/``status``.

    Returns:
        ``Result`` with ``solution`` the weights (shape and dtype of ``losses``, no gradient),
        flags of the batch shape and ``aux`` a :class:`DROAux`.

    Raises:
        ConvergenceError: when ``throw`` and a row failed.
        TypeError, ValueError: invalid losses or spec.

    Example:
        A batch of two problems: each row of weights lies on the simplex, and the value is the
        weighted loss minus the penalty:

        >>> import torch
        >>> from optlayers.solvers.dro import ChiSquarePenalty, robust_weights
        >>> losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 8.0]], dtype=torch.float64)
        >>> res = robust_weights(losses, ChiSquarePenalty(1.0))
        >>> res.solution.shape, res.aux.value.shape, res.converged.tolist()
        (torch.Size([2, 4]), torch.Size([2]), [True, True])
        >>> res.solution[1].tolist(), res.solution.sum(-1).tolist()
        ([0.0, 0.0, 0.0, 1.0], [1.0, 1.0])
        >>> D = ((4 * res.solution - 1) ** 2).mean(-1)
        >>> torch.allclose(res.aux.value, (res.solution * losses).sum(-1) - 1.0 * D)
        True
    """
    losses = _check_losses(losses)
    if not isinstance(spec, DROSpec):
        raise TypeError(f"spec must be a DRO spec (e.g. CVaR(0.1)), got {type(spec).__name__}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    tol_ = _default_tol(losses.dtype, tol)
    detached = losses.detach()
    if torch._C._are_functorch_transforms_active():  # vmap batches the solve by its rule
        p_out, conv, iters, res, status, eta, lam, div, penalty = _InnerSolve.apply(
            detached, spec, tol_, max_iter, backend, throw)
    else:
        p_out, conv, iters, res, status, eta, lam, div, penalty = _inner_solve(
            detached, spec, tol_, max_iter, backend, throw)
    value = torch.linalg.vecdot(p_out, losses)
    if penalty is not None:
        value = value - penalty
    aux = DROAux(value=value, dual=DRODual(eta=eta, lam=lam), divergence=div)
    return Result(solution=p_out, converged=conv, iterations=iters, residual=res, status=status, aux=aux)


def _inner_solve(losses: Tensor, spec: DROSpec, tol: float, max_iter: int, backend: Backend | str | None,
                 throw: bool) -> tuple[Any, ...]:
    """The weights and every reported tensor of :func:`robust_weights` for detached ``losses``
    (``(*batch, n)``): ``(p, converged, iterations, residual, status, eta, lam, divergence,
    penalty)``, in the losses' dtype and batch shape; ``penalty`` is ``None`` for a ball. Raises
    the :class:`~optlayers.ConvergenceError` of a failed row when ``throw``."""
    batch = losses.shape[:-1]
    n = losses.shape[-1]
    dt = losses.dtype
    with torch.no_grad():
        L = losses.reshape(-1, n).to(torch.float64)
        try:
            # one reduction and one host sync: a finite sum means every entry is finite (float64
            # sums of finite losses do not overflow in practice; if one does, the exact check runs)
            all_finite = math.isfinite(float(L.sum()))
        except RuntimeError as exc:  # a data-dependent branch under a transform with no rule for it
            if "vmap" not in str(exc):
                raise
            raise NotImplementedError(
                "robust_weights (and DROLoss) cannot branch on losses batched by this combination of "
                "torch.func transforms; pass the batch as leading dimensions instead: losses of shape "
                "(B, n) give B problems, solved together.") from exc
        finite = None
        if not all_finite:
            finite = torch.isfinite(L).all(1)
            all_finite = bool(finite.all())
        Ls = L if finite is None or all_finite else torch.where(finite[:, None], L, torch.zeros_like(L))
        sol = solve_flat(Ls.contiguous(), spec, tol=tol, max_iter=max_iter, backend=backend)
        p = sol.p
        conv = sol.converged
        res = sol.residual
        status = torch.where(conv, 0, int(Status.MAX_ITER))
        if not all_finite:
            assert finite is not None
            p = torch.where(finite[:, None], p, torch.full_like(p, math.nan))
            conv = conv & finite
            res = torch.where(finite, res, torch.full_like(res, math.nan))
            status = torch.where(finite, status, torch.full_like(status, int(Status.NONFINITE)))
        out = (p.to(dt).reshape(losses.shape), conv.reshape(batch), sol.iterations.reshape(batch),
               _out(res, dt, batch), status.reshape(batch), _out(sol.eta, dt, batch), _out(sol.lam, dt, batch),
               _out(sol.divergence, dt, batch), None if sol.zero_penalty else _out(sol.penalty, dt, batch))
    if throw and not (sol.closed_form and all_finite):  # a closed form on finite rows cannot fail
        value = torch.linalg.vecdot(out[0], losses)
        aux = DROAux(value=value if out[8] is None else value - out[8], dual=DRODual(eta=out[5], lam=out[6]),
                     divergence=out[7])
        result: Result[DROAux] = Result(solution=out[0], converged=out[1], iterations=out[2], residual=out[3],
                                        status=out[4], aux=aux)
        raise_if_failed(f"robust_weights[{type(spec).__name__}]", result, throw, tol=tol, max_iter=max_iter)
    return out


class _InnerSolve(torch.autograd.Function):
    """:func:`_inner_solve` as a function with a ``torch.func.vmap`` rule: the vmapped dimension
    becomes one more leading batch dimension of one solve (the solvers branch on the data, so
    they cannot be traced per example). Its outputs carry no derivative; the robust value gets
    the Danskin gradient from ``<p, losses>`` outside."""

    @staticmethod
    def forward(losses: Tensor, spec: DROSpec, tol: float, max_iter: int,  # type: ignore[override]
                backend: Backend | str | None, throw: bool) -> tuple[Tensor, ...]:
        out = _inner_solve(losses, spec, tol, max_iter, backend, throw)
        if out[-1] is None:  # a ball: a zero penalty, as outputs must be tensors
            out = (*out[:-1], torch.zeros_like(out[3]))
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:  # pragma: no cover - never reached
        return (None,) * 6

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], losses: Tensor, spec: DROSpec, tol: float,
             max_iter: int, backend: Backend | str | None, throw: bool) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
        d = in_dims[0]
        out = _InnerSolve.apply(losses if d is None else losses.movedim(d, 0), spec, tol, max_iter, backend, throw)
        return out, (None if d is None else 0,) * len(out)


def _out(t: Tensor, dtype: torch.dtype, batch: torch.Size) -> Tensor:
    return (t if t.dtype == dtype else t.to(dtype)).reshape(batch)

def _chi2_dual(L: Tensor, eta: Tensor, mu: Tensor, rho: float, lam: float) -> Tensor:
    n = L.shape[-1]
    nu = (mu - lam).clamp(min=0.0)
    sq = ((L - eta[..., None]).clamp(min=0.0) ** 2).sum(-1)
    body = torch.where(mu > 0, sq / (4.0 * mu.clamp(min=1e-300) * n), torch.where(sq > 0, math.inf, 0.0))
    return eta + mu + nu * rho + body


def dual_value(losses: Tensor, spec: DROSpec, dual: DRODual) -> Tensor:
    r"""Dual objective of ``spec`` at ``dual`` (an upper bound on the robust value when the duals
    are feasible; equal at the optimum). Differentiable in ``losses``.

    Implemented for CVaR (unsmoothed), the :math:`\chi^2` and KL balls and penalties (not the
    optimistic KL), Cressie–Read and holistic robustness. For the KL ball, say,

    .. math:: g(\eta, \lambda) = \eta + \lambda\rho
              + \lambda\Big(\frac1n\sum_i e^{(\ell_i-\eta)/\lambda} - 1\Big)
              \;\ge\; \max_{\mathrm{KL}(p\|u)\le\rho}\langle p, \ell\rangle
              \quad (\lambda > 0),

    with equality at the returned duals (weak and strong duality).

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import DRODual, KLBall, dual_value, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, KLBall(0.1))
        >>> torch.isclose(dual_value(losses, KLBall(0.1), res.aux.dual), res.aux.value)
        tensor(True)
        >>> other = DRODual(eta=torch.tensor(3.0, dtype=torch.float64), lam=torch.tensor(1.0, dtype=torch.float64))
        >>> bool(dual_value(losses, KLBall(0.1), other) > res.aux.value)  # any other duals: a bound
        True

    Raises:
        NotImplementedError: for specs without a scalar dual (TV, spectral, smoothed CVaR,
            optimistic KL).
    """
    L = losses
    n = L.shape[-1]
    eta, lam = dual.eta, dual.lam
    if isinstance(spec, CVaR) and spec.smoothing == 0:
        return eta + (L - eta[..., None]).clamp(min=0.0).sum(-1) / (spec.alpha * n)
    if isinstance(spec, ChiSquareBall):
        return _chi2_dual(L, eta, lam, spec.rho, spec.lam)
    if isinstance(spec, ChiSquarePenalty):
        return _chi2_dual(L, eta, lam, 0.0, spec.lam)
    if isinstance(spec, (KLBall, KLPenalty)) and not getattr(spec, "optimistic", False):
        rho = spec.rho if isinstance(spec, KLBall) else 0.0
        safe = lam.clamp(min=1e-300)
        body = safe * (torch.exp((L - eta[..., None]) / safe[..., None]).mean(-1) - 1.0)
        return torch.where(lam > 0, eta + lam * rho + body, L.amax(-1))
    if isinstance(spec, CressieRead):
        k = spec.k
        rho = spec.rho if spec.rho is not None else 0.0
        safe = lam.clamp(min=1e-300)
        s = (L - eta[..., None]) / safe[..., None]
        fstar = (((k - 1.0) * s + 1.0).clamp(min=0.0) ** (k / (k - 1.0)) - 1.0) / k
        return torch.where(lam > 0, eta + lam * rho + lam * fstar.mean(-1), L.amax(-1))
    if isinstance(spec, HolisticRobust):
        flat = L.detach().reshape(-1, n).to(torch.float64)
        q = holistic_poisoned_weights(flat, spec.alpha).to(L.dtype).reshape(L.shape)
        vmax = L.amax(-1)
        if spec.r == 0:
            return (q * L).sum(-1) + spec.alpha * vmax
        gl = torch.log(eta[..., None] - L)
        G = (q * gl).sum(-1) + spec.alpha * torch.log(eta - vmax)
        return eta - math.exp(-spec.r) * torch.exp(G)
    raise NotImplementedError(f"dual_value is not implemented for {type(spec).__name__}")

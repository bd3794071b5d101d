"""Hypergradients of bilevel problems: ``d/dλ L_out(w*(λ), λ)`` with ``w*(λ) = argmin_w L_in(w, λ)``.

Four methods, each a typed config:

* ``ImplicitAdjoint(linear_solver=CG())`` — exact IFT: solve ``∇²_ww L_in · u = ∇_w L_out`` with
  Hessian-vector products, then ``dL/dλ = ∇_λ L_out − ∇²_λw L_in · u``.
* ``ImplicitAdjoint(linear_solver=Neumann(terms, alpha))`` — the truncated Neumann series of
  Lorraine, Vicol & Duvenaud (AISTATS 2020), ``H⁻¹ ≈ α Σ_{k<K} (I − αH)^k``.
* :class:`PenaltyMethod` — the first-order penalty method of Kwon et al. (ICLR 2024): no
  second derivatives; values and gradients are O(σ)-close to the hyper-objective's.
* ``UnrollAdjoint(steps=T, truncate=K)`` — differentiate T gradient steps (the last K).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._result import AdjointSolveError, ConvergenceError, Result, Status, failure_message, register_aux
from ._tree import Layout
from .adjoints import ImplicitAdjoint, UnrollAdjoint
from .linear_solvers import CG, LinearOperator
from .solvers import LBFGS

__all__ = ["hypergradient", "PenaltyMethod", "HypergradientInfo"]

Loss = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class PenaltyMethod:
    """First-order penalty hypergradient (Kwon et al., "On Penalty Methods for Nonconvex Bilevel
    Optimization and First-Order Stochastic Approximation", ICLR 2024).

    With ``w_σ = argmin_w σ L_out(w, λ) + L_in(w, λ)`` (warm-started at the given ``params``,
    taken as ``w*``), the penalty hyper-objective's gradient is

    .. math:: ∇_λ L_{out}(w_σ, λ) + \\frac{∇_λ L_{in}(w_σ, λ) − ∇_λ L_{in}(w^*, λ)}{σ},

    which is within O(σ) of the true hypergradient. No Hessian-vector products.

    Args:
        sigma: Penalty weight σ > 0 (smaller is more accurate, the perturbed solve harder).
        steps: Maximum L-BFGS iterations for ``w_σ`` (warm-started at ``params``).
        rtol: Stop the ``w_σ`` solve when the gradient norm falls below ``rtol`` times its start.

    Example:
        Ridge regression's validation-loss gradient in the per-feature ridge weights ``λ``, by the
        penalty method and by the exact implicit gradient:

        >>> import torch
        >>> from optlayers.implicit import PenaltyMethod, hypergradient
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(30, 3, dtype=torch.float64, generator=g)
        >>> y = torch.randn(30, dtype=torch.float64, generator=g)
        >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w ** 2).sum()
        >>> outer = lambda w, lam: 0.5 * ((X @ w - 1) ** 2).sum()
        >>> lam = torch.ones(3, dtype=torch.float64)
        >>> w = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)
        >>> approx = hypergradient(outer, inner, w, lam, method=PenaltyMethod(sigma=1e-4)).solution
        >>> exact = hypergradient(outer, inner, w, lam).solution
        >>> torch.allclose(approx, exact, atol=1e-3)
        True
    """

    sigma: float = 1e-3
    steps: int = 500
    rtol: float = 1e-10

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@register_aux
@dataclasses.dataclass(frozen=True)
class HypergradientInfo:
    """Extras of :func:`hypergradient`.

    The hypergradient formulas assume ``∇_w L_in(w, λ) = 0`` at the given ``w``; ``inner_grad_norm``
    measures how far that holds, so a large value warns that ``params`` is not an inner solution
    and the hypergradient is that of a different point.

    Attributes:
        outer_value: ``L_out(w, λ)`` at the given inner solution.
        inner_grad_norm: ``‖∇_w L_in(w, λ)‖``: how far ``params`` is from stationarity.

    Example:
        >>> import torch
        >>> from optlayers.implicit import hypergradient
        >>> inner = lambda w, lam: 0.5 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> outer = lambda w, lam: (w ** 2).sum()
        >>> lam = torch.tensor(1.0, dtype=torch.float64)
        >>> info = hypergradient(outer, inner, torch.full((2,), 0.5, dtype=torch.float64), lam).aux
        >>> info.outer_value.item(), info.inner_grad_norm.item()  # w* = 1 / (1 + λ) = 0.5
        (0.5, 0.0)
        >>> hypergradient(outer, inner, torch.ones(2, dtype=torch.float64), lam).aux.inner_grad_norm
        tensor(1.4142, dtype=torch.float64)
    """

    outer_value: torch.Tensor
    inner_grad_norm: torch.Tensor


def _as_tree(x: Any) -> Any:
    if isinstance(x, nn.Module):
        return {k: v.detach() for k, v in x.named_parameters()}
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def hypergradient(outer_loss: Loss, inner_loss: Loss, params: Any, hparams: Any, *,
                  method: ImplicitAdjoint | PenaltyMethod | UnrollAdjoint | None = None,
                  throw: bool = True) -> Result:
    """The hypergradient ``dL_out/dλ`` at an (approximate) inner solution ``params``.

    Both losses are called as ``loss(params, hparams)`` and return a scalar. ``params`` and
    ``hparams`` are tensors, pytrees of tensors, or modules (their parameters are read as a dict
    name -> tensor, to use with ``torch.func.functional_call``; the module is never mutated).

    Args:
        outer_loss: ``L_out(w, λ)`` (e.g. the validation loss).
        inner_loss: ``L_in(w, λ)`` (e.g. the regularized training loss).
        params: The inner solution ``w ≈ w*(λ)``.
        hparams: The hyperparameters ``λ``.
        method: ``ImplicitAdjoint(linear_solver=CG())`` (default), ``ImplicitAdjoint(Neumann(k, α))``,
            :class:`PenaltyMethod` or ``UnrollAdjoint(steps=T, truncate=K)``.
        throw: Raise :class:`AdjointSolveError` when the linear solve fails.

    Returns:
        :class:`Result` whose ``solution`` mirrors ``hparams``; ``residual`` is the relative residual
        of the adjoint solve (0 for methods without one); ``aux`` is a :class:`HypergradientInfo`.

    Example:
        >>> import torch
        >>> X, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
        >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w ** 2).sum()
        >>> outer = lambda w, lam: 0.5 * ((X @ w - 1) ** 2).sum()
        >>> lam = torch.ones(3, dtype=torch.float64)
        >>> w = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)
        >>> hypergradient(outer, inner, w, lam).solution.shape
        torch.Size([3])
    """
    method = ImplicitAdjoint(linear_solver=CG()) if method is None else method
    w, lam = _as_tree(params), _as_tree(hparams)
    wl, ll = Layout(w, 0, "params"), Layout(lam, 0, "hparams")
    w_flat, lam_flat = wl.to_flat(w), ll.to_flat(lam)
    f_out = lambda wf, lf: outer_loss(wl.from_flat(wf), ll.from_flat(lf))  # noqa: E731
    f_in = lambda wf, lf: inner_loss(wl.from_flat(wf), ll.from_flat(lf))  # noqa: E731
    grad_w_in = torch.func.grad(f_in, argnums=0)
    with torch.no_grad():
        info = HypergradientInfo(f_out(w_flat, lam_flat).detach(),
                                 torch.linalg.vector_norm(grad_w_in(w_flat, lam_flat)))
    if isinstance(method, ImplicitAdjoint):
        hg, lin = _implicit(method, f_out, f_in, w_flat, lam_flat)
        if method.throw and throw and not bool(lin.converged.all()):
            raise AdjointSolveError(failure_message("hypergradient adjoint solve", lin) +
                                    " Check that params is a minimizer of inner_loss (the Hessian must be "
                                    "positive definite) or add ridge.", lin)
        return Result(ll.from_flat(hg), lin.converged.reshape(()), lin.iterations.reshape(()),
                      lin.residual.reshape(()), lin.status.reshape(()), info)
    if isinstance(method, PenaltyMethod):
        hg, iters = _penalty(method, f_out, f_in, w_flat, lam_flat)
    elif isinstance(method, UnrollAdjoint):
        hg, iters = _unroll(method, f_out, f_in, w_flat, lam_flat)
    else:
        raise ValueError(f"method must be ImplicitAdjoint, PenaltyMethod or UnrollAdjoint, got {method!r}")
    finite = torch.isfinite(hg).all()
    solved = iters >= 0  # the penalty method's perturbed solve reports failure as negative iterations
    ok = finite & solved
    code = Status.SUCCESS if bool(ok) else (Status.NONFINITE if not bool(finite) else Status.MAX_ITER)
    result = Result(ll.from_flat(hg), ok, torch.tensor(abs(iters)), torch.zeros((), dtype=hg.dtype),
                    torch.tensor(int(code)), info)
    if throw and not bool(ok):
        raise ConvergenceError(failure_message(f"hypergradient({type(method).__name__})", result) +
                               " For PenaltyMethod raise steps or loosen rtol.", result)
    return result


def _implicit(method: ImplicitAdjoint, f_out: Callable, f_in: Callable, w: torch.Tensor,
              lam: torch.Tensor) -> tuple[torch.Tensor, Result]:
    gw_out, gl_out = torch.func.grad(f_out, argnums=(0, 1))(w, lam)
    grad_w = lambda ww: torch.func.grad(f_in, argnums=0)(ww, lam)  # noqa: E731
    hvp_fn = torch.func.vjp(grad_w, w)[1]  # Hessian is symmetric: vjp == matvec; graph reused
    n = w.shape[-1]
    op = LinearOperator(matvec=lambda v: hvp_fn(v)[0], rmatvec=None, batch=1, n=n,
                        dtype=w.dtype, device=w.device, symmetric=True, positive_definite=True)
    solver: Any = method.linear_solver
    lin = solver(op, gw_out)
    u = lin.solution
    mixed_fn = torch.func.vjp(lambda ll: torch.func.grad(f_in, argnums=0)(w, ll), lam)[1]
    return (gl_out - mixed_fn(u)[0]).detach(), lin


def _lipschitz(f: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, iters: int = 20) -> float:
    """Largest Hessian eigenvalue of ``f`` at ``w`` by power iteration."""
    hvp = torch.func.vjp(torch.func.grad(f), w)[1]
    v = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(0)).to(w.device)
    est = 1.0
    for _ in range(iters):
        hv = hvp(v / torch.linalg.vector_norm(v))[0]
        est = float(torch.linalg.vector_norm(hv))
        v = hv
    return max(est, 1e-12)


def _penalty(method: PenaltyMethod, f_out: Callable, f_in: Callable, w_star: torch.Tensor,
             lam: torch.Tensor) -> tuple[torch.Tensor, int]:
    s = method.sigma
    pen = lambda ww: (s * f_out(ww, lam) + f_in(ww, lam)).reshape(1)  # noqa: E731
    res = LBFGS(max_iter=method.steps, rtol=method.rtol).run_minimize(pen, w_star.detach())
    w, it = res.solution, int(res.iterations.max())
    converged = bool(res.converged.all())
    gl_out = torch.func.grad(f_out, argnums=1)(w, lam)
    gl_in_s = torch.func.grad(f_in, argnums=1)(w, lam)
    gl_in_star = torch.func.grad(f_in, argnums=1)(w_star, lam)
    return (gl_out + (gl_in_s - gl_in_star) / s).detach(), (it if converged else -it)


def _unroll(method: UnrollAdjoint, f_out: Callable, f_in: Callable, w0: torch.Tensor,
            lam: torch.Tensor) -> tuple[torch.Tensor, int]:
    steps = method.steps or 100
    keep = method.truncate or steps
    step = 1.0 / _lipschitz(lambda ww: f_in(ww, lam), w0)
    grad = torch.func.grad(f_in, argnums=0)
    w = w0.detach()
    with torch.no_grad():
        for _ in range(steps - keep):
            w = w - step * grad(w, lam)

    def run(ll: torch.Tensor) -> torch.Tensor:
        ww = w
        for _ in range(keep):
            ww = ww - step * grad(ww, ll)
        return f_out(ww, ll)

    return torch.func.grad(run)(lam).detach(), steps

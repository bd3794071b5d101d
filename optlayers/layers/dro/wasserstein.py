r"""Wasserstein distributionally robust losses.

**Transport penalty (Sinha, Namkoong & Duchi, ICLR 2018, "WRM").** With labels held fixed and
cost :math:`c(x', x) = \lVert x' - x\rVert_2^2`,

.. math:: \phi_\gamma(\theta; x, y) = \sup_{x'} \ell(\theta; x', y) - \gamma\,c(x', x),\qquad
          \sup_{W_c(P,\hat P)\le\rho} \mathbb E_P\,\ell \;\le\; \gamma\rho + \mathbb E_{\hat P}\,\phi_\gamma .

For :math:`\gamma` above the smoothness of :math:`\ell` in :math:`x` the inner problem is
strongly concave and gradient ascent converges; with the default step :math:`1/(2\gamma)` it is
the fixed-point iteration :math:`x' \leftarrow x + \nabla_x\ell(x')/(2\gamma)`. The loss is
:math:`\mathbb E\,\phi_\gamma` with the Danskin gradient :math:`\nabla_\theta\ell(\theta; x^\star, y)`
(and :math:`2\gamma(x^\star - x)` for the inputs). :meth:`WassersteinPenaltyLoss.solve` returns
the adversarial points, :math:`\phi`, the transport costs, and
:func:`wasserstein_certificate` the bound :math:`\gamma\rho + \mathbb E\phi_\gamma`.

**Linear models, exact (Shafieezadeh-Abadeh, Mohajerin Esfahani & Kuhn, NeurIPS 2015).** For a
1-Lipschitz margin loss :math:`L` (logistic, hinge), labels :math:`y\in\{\pm1\}`, transport cost
:math:`\lVert x - x'\rVert_p + \kappa[y\ne y']`:

* :math:`\kappa=\infty`: :math:`\sup_{W\le\varepsilon}\mathbb E\,L = \mathbb E_{\hat P} L(y\,w^\top x)
  + \varepsilon\lVert w\rVert_{q}` (norm regularisation, :math:`1/p + 1/q = 1`);
* finite :math:`\kappa` (label flips):
  :math:`\min_{\lambda\ge\lVert w\rVert_q} \lambda\varepsilon + \frac1n\sum_i
  \max\big(L(y_iw^\top x_i),\ L(-y_iw^\top x_i) - \lambda\kappa\big)` — piecewise linear and
  convex in :math:`\lambda`, minimised exactly by a selection among the breakpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._result import Result, raise_if_failed, register_aux, status_from

__all__ = [
    "WassersteinAux",
    "WassersteinPenaltyLoss",
    "wasserstein_certificate",
    "wasserstein_linear_risk",
    "WassersteinLinearLoss",
]


@register_aux
@dataclasses.dataclass(frozen=True)
class WassersteinAux:
    r"""Extras of the transport-penalty inner problem (per example).

    With :math:`x^\star_i` the adversarial input of example :math:`i`,
    :math:`\phi_\gamma = \ell(x^\star_i) - \gamma\lVert x^\star_i - x_i\rVert^2`.

    Attributes:
        phi: :math:`\phi_\gamma` per example.
        transport_cost: :math:`\lVert x^\star - x\rVert^2` per example; its mean is the radius
            :math:`\hat\rho` at which the certificate equals :math:`\mathbb E\,\ell(x^\star)`.
        gamma: The penalty :math:`\gamma` (0-d tensor).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from optlayers.layers.dro import WassersteinPenaltyLoss
        >>> model = torch.nn.Linear(2, 3).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
        >>> res = WassersteinPenaltyLoss(gamma=5.0).solve(model, x, y)
        >>> aux = res.aux
        >>> aux.phi.shape, aux.transport_cost.shape, float(aux.gamma), bool(res.converged.all())
        (torch.Size([5]), torch.Size([5]), 5.0, True)
        >>> adv = F.cross_entropy(model(res.solution), y, reduction="none")
        >>> torch.allclose(aux.phi, adv - 5.0 * aux.transport_cost)
        True
    """

    phi: Tensor
    transport_cost: Tensor
    gamma: Tensor


def wasserstein_certificate(aux: WassersteinAux, rho: float | Tensor) -> Tensor:
    r"""Upper bound :math:`\gamma\rho + \mathbb E\,\phi_\gamma` on the worst-case risk over the
    Wasserstein ball of radius ``rho`` (squared-Euclidean cost) around the batch.

    .. math:: \sup_{W_c(P,\hat P)\le\rho} \mathbb E_P\,\ell \;\le\;
              \gamma\rho + \frac1n\sum_i \phi_\gamma(x_i).

    Example:
        At :math:`\hat\rho` = the mean transport cost, the bound equals the mean loss at the
        adversarial points (and it grows linearly in ``rho``):

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from optlayers.layers.dro import WassersteinPenaltyLoss, wasserstein_certificate
        >>> model = torch.nn.Linear(2, 3).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
        >>> res = WassersteinPenaltyLoss(gamma=5.0).solve(model, x, y)
        >>> rho_hat = res.aux.transport_cost.mean()
        >>> adv = F.cross_entropy(model(res.solution), y)
        >>> torch.allclose(wasserstein_certificate(res.aux, rho_hat), adv)
        True
        >>> gap = wasserstein_certificate(res.aux, 0.2) - wasserstein_certificate(res.aux, 0.1)
        >>> round(float(gap.detach()), 10)
        0.5
    """
    return aux.gamma * rho + aux.phi.mean()


class WassersteinPenaltyLoss(nn.Module):
    """Sinha et al.'s Wasserstein robust loss by inner gradient ascent on the inputs.

    Args:
        gamma: Transport penalty :math:`\\gamma > 0` (larger than the input-smoothness of the
            loss for the inner problem to be concave).
        criterion: Per-example loss ``criterion(output, target)``; default cross-entropy.
        max_iter: Ascent steps (default 50).
        step_size: Ascent step (default :math:`1/(2\\gamma)`).
        rtol, atol: Per-example stop test
            :math:`\\lVert\\nabla_{x'}F\\rVert \\le \\text{atol} + \\text{rtol}\\,\\lVert\\nabla_{x'}\\ell\\rVert`
            (defaults ``1e-4`` and ``1e-8``).
        bounds: Optional ``(low, high)`` box for the adversarial inputs (projected ascent).
        throw: Raise :class:`~optlayers.ConvergenceError` if an example's ascent did not meet the
            tolerance within ``max_iter``.

    The model is put in eval mode during the ascent (restored afterwards) and parameter
    gradients are not touched by it.

    Example:
        >>> import torch
        >>> from optlayers.layers.dro import WassersteinPenaltyLoss
        >>> model = torch.nn.Linear(2, 2).double()
        >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> loss = WassersteinPenaltyLoss(gamma=5.0)(model, x, y)
        >>> clean = torch.nn.functional.cross_entropy(model(x), y)
        >>> bool(loss >= clean)  # x' = x is feasible, so the sup is at least the clean loss
        True
        >>> loss.backward()
        >>> model.weight.grad.shape
        torch.Size([2, 2])
    """

    def __init__(self, gamma: float, *, criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
                 max_iter: int = 50, step_size: float | None = None, rtol: float = 1e-4, atol: float = 1e-8,
                 bounds: tuple[float, float] | None = None, throw: bool = True) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.gamma = float(gamma)
        self.criterion = criterion
        self.max_iter = int(max_iter)
        self.step_size = float(step_size) if step_size is not None else 1.0 / (2.0 * self.gamma)
        self.rtol, self.atol = float(rtol), float(atol)
        self.bounds = bounds
        self.throw = bool(throw)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, max_iter={self.max_iter}"

    def _losses(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        out = model(x)
        if self.criterion is None:
            return F.cross_entropy(out, y, reduction="none")
        return self.criterion(out, y)

    def solve(self, model: nn.Module, x: Tensor, y: Tensor) -> Result[WassersteinAux]:
        """Inner ascent. ``solution`` is :math:`x^\\star` (detached); ``aux`` a
        :class:`WassersteinAux` whose ``phi`` carries gradients to the model (and to ``x``)."""
        x0 = x.detach()
        xa = x0.clone()
        B = x0.shape[0]
        dims = tuple(range(1, x0.dim()))
        conv = torch.zeros(B, dtype=torch.bool, device=x0.device)
        iters = torch.zeros(B, dtype=torch.int64, device=x0.device)
        res = torch.full((B,), math.inf, dtype=x0.dtype, device=x0.device)
        was_training = model.training
        model.eval()
        try:
            for _ in range(self.max_iter + 1):
                with torch.enable_grad():
                    xv = xa.clone().requires_grad_(True)
                    gl = torch.autograd.grad(self._losses(model, xv, y).sum(), xv)[0]
                gF = gl - 2.0 * self.gamma * (xa - x0)
                if self.bounds is not None:  # projected-gradient residual
                    lo, hi = self.bounds
                    gF = (xa + self.step_size * gF).clamp(lo, hi) - xa
                    gF = gF / self.step_size
                res = gF.flatten(1).norm(dim=1)
                conv = res <= self.atol + self.rtol * gl.flatten(1).norm(dim=1)
                if bool(conv.all()) or int(iters.max()) >= self.max_iter:
                    break
                step = torch.where(conv.reshape((B,) + (1,) * len(dims)), torch.zeros_like(gF), gF)
                xa = xa + self.step_size * step
                if self.bounds is not None:
                    xa = xa.clamp(*self.bounds)
                iters = iters + (~conv).to(torch.int64)
        finally:
            model.train(was_training)
        xs = xa.detach()
        cost = ((xs - x) ** 2).flatten(1).sum(1)
        phi = self._losses(model, xs, y) - self.gamma * cost
        aux = WassersteinAux(phi=phi, transport_cost=cost.detach(),
                             gamma=torch.tensor(self.gamma, dtype=phi.dtype, device=phi.device))
        result = Result(solution=xs, converged=conv, iterations=iters, residual=res,
                        status=status_from(conv, res), aux=aux)
        return raise_if_failed("WassersteinPenaltyLoss", result, self.throw, tol=self.rtol, max_iter=self.max_iter)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\mathbb E\\,\\phi_\\gamma` over the batch, with the Danskin gradient."""
        return self.solve(model, x, y).aux.phi.mean()


def _margin_loss(name: str) -> Callable[[Tensor], Tensor]:
    if name == "logistic":
        return lambda m: F.softplus(-m)
    if name == "hinge":
        return lambda m: (1.0 - m).clamp(min=0.0)
    raise ValueError(f"loss must be 'logistic' or 'hinge', got {name!r}")


def _dual_norm(w: Tensor, p: float) -> Tensor:
    r""":math:`\|w\|_q` with :math:`1/p + 1/q = 1`; its autograd subgradient at ``w = 0`` is 0 (not
    NaN), so a fit may start from zero weights."""
    q = math.inf if p == 1 else (1.0 if p == math.inf else p / (p - 1.0))
    return torch.linalg.vector_norm(w, ord=q, dim=-1)


def wasserstein_linear_risk(weight: Tensor, bias: Tensor | float, x: Tensor, y: Tensor, eps: float, *,
                            kappa: float = math.inf, loss: str = "logistic", p: float = 2.0) -> Tensor:
    r"""Exact worst-case risk of a linear classifier over a Wasserstein ball (see module doc).

    It computes, with :math:`m_i = y_i(w^\top x_i + b)` and :math:`1/p + 1/q = 1`,

    .. math:: \kappa = \infty:\ \frac1n\sum_i L(m_i) + \varepsilon\lVert w\rVert_q,\qquad
              \kappa < \infty:\ \min_{\lambda\ge\lVert w\rVert_q} \lambda\varepsilon
              + \frac1n\sum_i \max\big(L(m_i),\ L(-m_i) - \lambda\kappa\big).

    Args:
        weight: ``(d,)`` weights :math:`w`.
        bias: Intercept (not transported).
        x: ``(n, d)`` features; ``y``: ``(n,)`` labels in ``{-1, +1}``.
        eps: Radius :math:`\varepsilon \ge 0`.
        kappa: Label-flip cost (``inf``: labels fixed).
        loss: ``"logistic"`` or ``"hinge"`` (both 1-Lipschitz).
        p: Norm of the feature transport cost (``1``, ``2``, ``inf``, ...).

    Returns:
        The robust risk (0-d), differentiable in ``weight``, ``bias`` and ``x``.

    Example:
        With labels fixed it is the empirical logistic risk plus :math:`\varepsilon\lVert w\rVert_2`;
        allowing label flips (finite ``kappa``) can only increase it:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from optlayers.layers.dro import wasserstein_linear_risk
        >>> x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.5, -1.0], [2.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
        >>> w, b = torch.tensor([0.5, 0.3], dtype=torch.float64), 0.1
        >>> fixed = wasserstein_linear_risk(w, b, x, y, eps=0.1)
        >>> torch.isclose(fixed, F.softplus(-y * (x @ w + b)).mean() + 0.1 * w.norm())
        tensor(True)
        >>> flips = wasserstein_linear_risk(w, b, x, y, eps=0.1, kappa=0.5)
        >>> bool(flips >= fixed), round(float(fixed), 4), round(float(flips), 4)
        (True, 0.5028, 0.7245)

        The exact minimum over :math:`\lambda` agrees with a fine grid search:

        >>> m = y * (x @ w + b)
        >>> lam = torch.linspace(float(w.norm()), 20.0, 200001, dtype=torch.float64)
        >>> grid = 0.1 * lam + torch.maximum(F.softplus(-m), F.softplus(m) - 0.5 * lam[:, None]).mean(-1)
        >>> round(float(grid.min()), 4)
        0.7245
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not (kappa > 0):
        raise ValueError(f"kappa must be > 0, got {kappa}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    L = _margin_loss(loss)
    m = y.to(x.dtype) * (x @ weight + bias)
    a = L(m)
    lam_min = _dual_norm(weight, p)
    if math.isinf(kappa):
        return a.mean() + eps * lam_min
    b = L(-m)
    n = a.shape[0]
    t = (b - a) / kappa  # breakpoints: the i-th max switches to the flipped term below t_i
    # f(lam) = lam eps + mean max(a, b - lam kappa); slope eps - kappa #{t_i > lam} / n
    m_allowed = math.floor(n * eps / kappa + 1e-12)
    if m_allowed >= n:
        lam = lam_min
    else:
        t_sel = torch.topk(t, m_allowed + 1).values[-1]
        lam = torch.maximum(lam_min, t_sel)
    return lam * eps + torch.maximum(a, b - lam * kappa).mean()


class WassersteinLinearLoss(nn.Module):
    r"""Module form of :func:`wasserstein_linear_risk` for an ``nn.Linear(d, 1)``:
    ``forward(linear, x, y)`` with labels in ``{-1, +1}``.

    .. math:: \sup_{W(P,\hat P)\le\varepsilon} \mathbb E_{(x, y)\sim P}\,L\big(y\,(w^\top x + b)\big),

    with transport cost :math:`\lVert x - x'\rVert_p + \kappa[y\ne y']` (exact; see the module
    docstring).

    Example:
        >>> import torch
        >>> from optlayers.layers.dro import WassersteinLinearLoss, wasserstein_linear_risk
        >>> linear = torch.nn.Linear(2, 1).double()
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> y = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
        >>> loss = WassersteinLinearLoss(0.1, kappa=1.0)(linear, x, y)
        >>> ref = wasserstein_linear_risk(linear.weight[0], linear.bias[0], x, y, 0.1, kappa=1.0)
        >>> torch.equal(loss, ref)
        True
        >>> loss.backward()
        >>> linear.weight.grad.shape
        torch.Size([1, 2])
    """

    def __init__(self, eps: float, *, kappa: float = math.inf, loss: str = "logistic", p: float = 2.0) -> None:
        super().__init__()
        _margin_loss(loss)
        self.eps, self.kappa, self.loss, self.p = float(eps), float(kappa), loss, float(p)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, kappa={self.kappa}, loss={self.loss!r}, p={self.p}"

    def forward(self, linear: nn.Linear, x: Tensor, y: Tensor) -> Tensor:
        if linear.out_features != 1:
            raise ValueError("WassersteinLinearLoss needs a linear layer with one output")
        bias = linear.bias[0] if linear.bias is not None else 0.0
        return wasserstein_linear_risk(linear.weight[0], bias, x, y, self.eps, kappa=self.kappa,
                                       loss=self.loss, p=self.p)

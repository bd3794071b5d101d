"""Debiased Sinkhorn divergence as a loss, with GeomLoss's conventions.

.. math::
    S_\\varepsilon(\\alpha, \\beta) = \\mathrm{OT}_\\varepsilon(\\alpha, \\beta)
        - \\tfrac12 \\mathrm{OT}_\\varepsilon(\\alpha, \\alpha)
        - \\tfrac12 \\mathrm{OT}_\\varepsilon(\\beta, \\beta)
        + \\tfrac{\\varepsilon}{2} (m(\\alpha) - m(\\beta))^2

(the last term only matters for unbalanced problems; Séjourné et al., 2019). ``S ≥ 0`` and
``S(α, α) = 0``. Cost and temperature follow ``geomloss.SamplesLoss("sinkhorn")``:
``C(x, y) = ‖x − y‖^p / p``, ``ε = blur^p``, KL marginal strength ``ρ = reach^p``, and
ε-annealing from the largest cost down by factors ``scaling^p`` — but unlike GeomLoss every
annealing stage runs to its own tolerance, so the result is a converged divergence.
"""

from __future__ import annotations

import torch
from torch import nn

from ...solvers.ot import AndersonAcceleration, Anneal, Envelope, PNorm, PointCloud, SqEuclidean, sinkhorn
from ...solvers.ot.sinkhorn import Gradient

__all__ = ["sinkhorn_divergence", "SinkhornLoss"]

_ENVELOPE = Envelope()
_ANDERSON = AndersonAcceleration()


def _ot(a: torch.Tensor | None, x: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, *,
        p: float, eps: float, rho: float | None, anneal: Anneal | None, tol: float | None,
        max_iter: int, gradient: Gradient | str, online: bool | None, throw: bool,
        acceleration: AndersonAcceleration | None, symmetric: bool = False) -> torch.Tensor:
    cost = SqEuclidean(0.5) if p == 2 else PNorm(p, 1.0 / p)
    res = sinkhorn(a, b, PointCloud(x, y, cost, online=online), epsilon=eps, rho_a=rho, rho_b=rho,
                   anneal=anneal, tol=tol, max_iter=max_iter, gradient=gradient, throw=throw,
                   acceleration=acceleration, symmetric=symmetric)
    return res.aux.value


def sinkhorn_divergence(a: torch.Tensor | None, x: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, *,
                        p: float = 2, blur: float = 0.05, reach: float | None = None,
                        scaling: float = 0.5, debias: bool = True, tol: float | None = 1e-3,
                        max_iter: int = 10_000, gradient: Gradient | str = _ENVELOPE,
                        online: bool | None = None,
                        acceleration: AndersonAcceleration | None = _ANDERSON,
                        throw: bool = True) -> torch.Tensor:
    """Sinkhorn divergence between weighted point clouds (GeomLoss's conventions).

    Args:
        a: ``(*batch, n)`` weights or None (uniform); x: ``(*batch, n, d)``.
        b: ``(*batch, m)`` weights or None; y: ``(*batch, m, d)``.
        p: Exponent of the ground cost ``‖x − y‖^p / p``.
        blur: ``ε = blur^p``.
        reach: None (balanced) or the unbalanced reach (``ρ = reach^p``).
        scaling: ε-annealing factor in blur units (``decay = scaling^p``); 0 disables annealing.
        debias: Subtract ``½OT(a, a) + ½OT(b, b)`` (the divergence); False gives ``OT_ε(a, b)``.
        tol: L1 marginal error that every solve (every annealing stage included) reaches;
            default ``1e-3`` (GeomLoss's default schedule stops near 0.2); None: the solver's
            default (1e-6 float64 / 1e-4 float32), much slower at small ``blur``.
        max_iter: Iterations per solve.
        gradient: Gradient mode of the solves (:class:`Envelope` default; :class:`Implicit`
            for exact second derivatives).
        online: Online cost evaluation (None: above a size threshold).
        acceleration: Anderson acceleration of the solves (default on; None disables).
        throw: Raise :class:`ConvergenceError` when a solve fails.

    Returns:
        ``(*batch,)`` divergence values.

    Example:
        >>> import torch
        >>> from optlayers.layers.ot import sinkhorn_divergence
        >>> x = torch.randn(100, 2, dtype=torch.float64)
        >>> float(sinkhorn_divergence(None, x, None, x)) == 0.0
        True
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    if not blur > 0:
        raise ValueError(f"blur must be positive, got {blur}")
    if not 0.0 <= scaling < 1.0:
        raise ValueError(f"scaling must be in [0, 1), got {scaling}")
    eps = float(blur) ** p
    rho = None if reach is None else float(reach) ** p
    anneal = Anneal(decay=float(scaling) ** p) if scaling > 0 else None
    kw = dict(p=p, eps=eps, rho=rho, anneal=anneal, tol=tol, max_iter=max_iter, gradient=gradient,
              online=online, throw=throw, acceleration=acceleration)
    same = (a is b or (a is None and b is None)) and (
        x is y or (not torch._C._are_functorch_transforms_active() and x.shape == y.shape
                   and bool(torch.equal(x, y))))
    ab = _ot(a, x, b, y, symmetric=same, **kw)  # type: ignore[arg-type]
    if not debias:
        return ab
    aa = _ot(a, x, a, x, symmetric=True, **kw)  # type: ignore[arg-type]
    bb = _ot(b, y, b, y, symmetric=True, **kw)  # type: ignore[arg-type]
    out = ab - 0.5 * (aa + bb)
    if rho is not None:
        ma = 1.0 if a is None else a.sum(-1)
        mb = 1.0 if b is None else b.sum(-1)
        out = out + 0.5 * eps * (ma - mb) ** 2
    return out


class SinkhornLoss(nn.Module):
    """``nn.Module`` form of :func:`sinkhorn_divergence`, a drop-in for ``geomloss.SamplesLoss``.

    Call as ``loss(x, y)`` (uniform weights) or ``loss(a, x, b, y)``. Computes the debiased
    Sinkhorn divergence with ``C(x, y) = ‖x − y‖^p / p`` and ``ε = blur^p``:

    .. math::
        S_\\varepsilon(\\alpha, \\beta) = \\mathrm{OT}_\\varepsilon(\\alpha, \\beta)
            - \\tfrac12 \\mathrm{OT}_\\varepsilon(\\alpha, \\alpha)
            - \\tfrac12 \\mathrm{OT}_\\varepsilon(\\beta, \\beta),

    nonnegative and zero when ``α = β`` (plus ``ε/2 (m(α) − m(β))²`` when ``reach`` relaxes the
    marginals).

    Args:
        p, blur, reach, scaling, debias: As in :func:`sinkhorn_divergence` / GeomLoss.
        tol, max_iter, gradient, online, acceleration, throw: Solver options (keyword-only).

    Example:
        >>> import torch
        >>> from optlayers.layers.ot import SinkhornLoss, sinkhorn_divergence
        >>> loss = SinkhornLoss(p=2, blur=0.05)
        >>> x = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
        >>> y = torch.randn(64, 2, dtype=torch.float64)
        >>> value = loss(x, y)
        >>> torch.allclose(value, sinkhorn_divergence(None, x, None, y, p=2, blur=0.05))
        True
        >>> bool(value > 0), float(loss(y, y))
        (True, 0.0)
        >>> value.backward()
        >>> x.grad.shape
        torch.Size([64, 2])
    """

    def __init__(self, p: float = 2, blur: float = 0.05, reach: float | None = None,
                 scaling: float = 0.5, debias: bool = True, *, tol: float | None = 1e-3,
                 max_iter: int = 10_000, gradient: Gradient | str = _ENVELOPE,
                 online: bool | None = None,
                 acceleration: AndersonAcceleration | None = _ANDERSON,
                 throw: bool = True) -> None:
        super().__init__()
        self.acceleration = acceleration
        self.p, self.blur, self.reach, self.scaling, self.debias = p, blur, reach, scaling, debias
        self.tol, self.max_iter, self.gradient, self.online, self.throw = tol, max_iter, gradient, online, throw

    def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        if len(args) == 2:
            a, x, b, y = None, args[0], None, args[1]
        elif len(args) == 4:
            a, x, b, y = args
        else:
            raise ValueError(f"call as loss(x, y) or loss(a, x, b, y); got {len(args)} arguments")
        if x is None or y is None:
            raise ValueError("x and y must be tensors")
        return sinkhorn_divergence(a, x, b, y, p=self.p, blur=self.blur, reach=self.reach,
                                   scaling=self.scaling, debias=self.debias, tol=self.tol,
                                   max_iter=self.max_iter, gradient=self.gradient,
                                   online=self.online, acceleration=self.acceleration,
                                   throw=self.throw)

    def extra_repr(self) -> str:
        return (f"p={self.p}, blur={self.blur}, reach={self.reach}, scaling={self.scaling}, "
                f"debias={self.debias}")

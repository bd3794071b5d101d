r"""Typed uncertainty sets for distributionally robust losses.

Every spec describes the inner problem over weights :math:`p` on the probability simplex
:math:`\Delta_n` for a vector of :math:`n` losses :math:`\ell`:

* a *ball* spec solves :math:`\max_{p \in \Delta_n,\ D(p) \le \rho} \langle p, \ell \rangle`;
* a *penalty* spec solves :math:`\max_{p \in \Delta_n} \langle p, \ell \rangle - \lambda D(p)`,
  with :math:`D` exactly the divergence of the matching ball.

Conventions (fixed; converters from other libraries are classmethods):

==========================  ==================================================================
``CVaR(alpha)``              average of the worst :math:`\alpha` fraction:
                             :math:`p_i \le 1/(\alpha n)`; :math:`\alpha = 1` is the mean,
                             :math:`\alpha = 1/n` the max. Fractional atom when
                             :math:`\alpha n \notin \mathbb{Z}`.
``TotalVariation(eps)``      :math:`\tfrac12 \lVert p - u \rVert_1 \le \varepsilon`
``ChiSquareBall(rho)``       :math:`D(p) = \tfrac1n \sum_i (n p_i - 1)^2 \le \rho`
                             (fast-dro and ``dro``'s neural losses use *half* of this)
``ChiSquarePenalty(lam)``    :math:`\langle p,\ell\rangle - \lambda \tfrac1n \sum_i (n p_i-1)^2`
``KLBall(rho)``              :math:`\mathrm{KL}(p \,\|\, u) \le \rho`
``KLPenalty(lam)``           :math:`\langle p,\ell\rangle - \lambda\,\mathrm{KL}(p\,\|\,u)`
``CressieRead(k, rho|lam)``  :math:`D_k(p) = \tfrac1n\sum_i f_k(n p_i)`,
                             :math:`f_k(t) = \frac{t^k - k t + k - 1}{k(k-1)}`
                             (:math:`k = 2` is *half* the :math:`\chi^2` above)
``Spectral(sigma, lam)``     :math:`p` in the permutahedron of :math:`\sigma`, penalty
                             :math:`\lambda D` with :math:`D` the :math:`\chi^2` or KL above
``HolisticRobust(a, r)``     poisoning budget :math:`\alpha` (TV) and KL radius :math:`r`
==========================  ==================================================================

Here :math:`u = (1/n, \dots, 1/n)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "DROSpec",
    "CVaR",
    "TotalVariation",
    "ChiSquareBall",
    "ChiSquarePenalty",
    "KLBall",
    "KLPenalty",
    "CressieRead",
    "Spectrum",
    "Superquantile",
    "Extremile",
    "ESRM",
    "CustomSpectrum",
    "superquantile",
    "extremile",
    "esrm",
    "Spectral",
    "HolisticRobust",
]


def _finite(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


class DROSpec:
    r"""Base class of every uncertainty-set spec (frozen dataclasses).

    A spec fixes the inner problem that :func:`~optlayers.solvers.dro.robust_weights` solves over
    the last dimension of the losses :math:`\ell \in \mathbb{R}^n`,

    .. math:: R(\ell) = \max_{p \in \mathcal U \subseteq \Delta_n} \langle p, \ell\rangle - \lambda D(p),

    with :math:`\mathcal U` a ball (``CVaR``, ``ChiSquareBall``, ...) or the whole simplex with a
    penalty (``ChiSquarePenalty``, ``KLPenalty``, ...); see the module table for each convention.

    Example:
        >>> from optlayers.solvers.dro import CVaR, DROSpec, KLPenalty
        >>> isinstance(CVaR(0.1), DROSpec), isinstance(KLPenalty(0.5), DROSpec)
        (True, True)
    """


@dataclasses.dataclass(frozen=True)
class CVaR(DROSpec):
    r"""Conditional value at risk (superquantile) of tail fraction ``alpha``.

    .. math:: \mathrm{CVaR}_\alpha(\ell) = \max_{p \in \Delta_n,\ p_i \le 1/(\alpha n)}
              \langle p, \ell \rangle
              = \min_\eta\ \eta + \frac{1}{\alpha n}\sum_i (\ell_i - \eta)_+ .

    The maximiser gives :math:`1/(\alpha n)` to the :math:`\lfloor \alpha n\rfloor` largest
    losses and the remaining mass to the next one (the fractional atom); losses tied at the
    threshold share equally. ``alpha = 1`` is the mean, ``alpha = 1/n`` the max.

    With ``smoothing = s > 0`` (fast-dro's ``reg``) the objective is KL-regularised:
    :math:`\max_p \langle p,\ell\rangle - s\,\mathrm{KL}(p\|u)` over the same set, whose
    maximiser :math:`p_i = \min(e^{(\ell_i-\eta)/s - 1}, 1/\alpha)/n` is found by a safeguarded
    Newton–bisection on :math:`\eta`.

    Args:
        alpha: Tail fraction in (0, 1].
        smoothing: KL regularisation strength :math:`s \ge 0`.

    Example:
        The worst half of four losses, and the dual formula at :math:`\eta = 3` (the VaR):

        >>> import torch
        >>> from optlayers.solvers.dro import CVaR, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, CVaR(0.5))
        >>> res.solution.tolist(), float(res.aux.value)
        ([0.0, 0.0, 0.5, 0.5], 3.5)
        >>> float(3.0 + (losses - 3.0).clamp(min=0).sum() / (0.5 * 4))
        3.5
        >>> robust_weights(losses, CVaR(0.3)).solution.tolist()  # alpha n = 1.2: a fractional atom
        [0.0, 0.0, 0.16666666666666663, 0.8333333333333334]
    """

    alpha: float
    smoothing: float = dataclasses.field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        a = _finite("alpha", self.alpha)
        if not 0.0 < a <= 1.0:
            raise ValueError(f"CVaR alpha (the tail fraction) must be in (0, 1], got {a}")
        s = _finite("smoothing", self.smoothing)
        if s < 0:
            raise ValueError(f"CVaR smoothing must be >= 0, got {s}")
        _set(self, "alpha", a)
        _set(self, "smoothing", s)

    @classmethod
    def from_quantile_level(cls, q: float, *, smoothing: float = 0.0) -> CVaR:
        """CVaR at quantile level ``q`` (deshift's ``tail_prob``, Prospect's superquantile):
        the worst ``1 - q`` fraction."""
        return cls(1.0 - _finite("q", q), smoothing=smoothing)

    @classmethod
    def from_fastdro(cls, size: float, reg: float = 0.0) -> CVaR:
        """fast-dro ``RobustLoss(geometry='cvar', size, reg)``: ``size`` is the tail fraction."""
        return cls(size, smoothing=reg)


@dataclasses.dataclass(frozen=True)
class TotalVariation(DROSpec):
    r"""Total-variation ball :math:`\tfrac12\lVert p - u\rVert_1 \le \varepsilon`.

    .. math:: \max_{p} \langle p,\ell\rangle
              = (1-\varepsilon)\,\mathrm{CVaR}_{1-\varepsilon}(\ell) + \varepsilon \max_i \ell_i

    (``dro.TVDRO(eps)`` uses the same convention.)

    Args:
        eps: Radius in [0, 1].

    Example:
        The value is :math:`(1-\varepsilon)\,\mathrm{CVaR}_{1-\varepsilon} + \varepsilon\max_i\ell_i`:

        >>> import torch
        >>> from optlayers.solvers.dro import CVaR, TotalVariation, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, TotalVariation(0.25))
        >>> res.solution.tolist(), float(res.aux.value)
        ([0.0, 0.25, 0.25, 0.5], 3.25)
        >>> float(0.75 * robust_weights(losses, CVaR(0.75)).aux.value + 0.25 * losses.max())
        3.25
    """

    eps: float

    def __post_init__(self) -> None:
        e = _finite("eps", self.eps)
        if not 0.0 <= e <= 1.0:
            raise ValueError(f"TotalVariation eps must be in [0, 1], got {e}")
        _set(self, "eps", e)


@dataclasses.dataclass(frozen=True)
class ChiSquareBall(DROSpec):
    r""":math:`\chi^2` ball :math:`D(p) = \frac1n\sum_i (n p_i - 1)^2 \le \rho`, with an optional
    penalty :math:`\lambda D(p)` (fast-dro's "size and reg").

    .. math:: \max_{p\in\Delta_n,\ D(p)\le\rho} \langle p,\ell\rangle - \lambda D(p)
              = \min_{\eta,\ \nu\ge 0}\ \eta + (\lambda+\nu) + \nu\rho
                + \frac{1}{4(\lambda+\nu) n}\sum_i (\ell_i-\eta)_+^2 ,

    which for :math:`\lambda = 0` is
    :math:`\min_\eta \eta + \sqrt{1+\rho}\,\sqrt{\tfrac1n\sum_i(\ell_i-\eta)_+^2}`.
    The maximiser :math:`p_i = (\ell_i-\eta)_+ / (2(\lambda+\nu)n)` is computed *exactly* by a
    sort and a scan over support sizes (no tolerance).

    Args:
        rho: Radius :math:`\rho \ge 0` (0 gives the mean).
        lam: Penalty :math:`\lambda \ge 0` (keyword only).

    Example:
        The weights sit on the boundary :math:`D(p) = \rho` and equal
        :math:`(\ell - \eta)_+ / (2\mu n)` with the returned duals :math:`(\eta, \mu)`:

        >>> import torch
        >>> from optlayers.solvers.dro import ChiSquareBall, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, ChiSquareBall(1.0))
        >>> p, (eta, mu) = res.solution, (res.aux.dual.eta, res.aux.dual.lam)
        >>> round(float(res.aux.value), 6), round(float(((4 * p - 1) ** 2).mean()), 6)
        (3.57735, 1.0)
        >>> torch.allclose(p, (losses - eta).clamp(min=0) / (2 * mu * 4))
        True
    """

    rho: float
    lam: float = dataclasses.field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        r = _finite("rho", self.rho)
        if r < 0:
            raise ValueError(f"ChiSquareBall rho must be >= 0, got {r}")
        lam = _finite("lam", self.lam)
        if lam < 0:
            raise ValueError(f"ChiSquareBall lam must be >= 0, got {lam}")
        _set(self, "rho", r)
        _set(self, "lam", lam)

    @classmethod
    def from_fastdro(cls, size: float, reg: float = 0.0) -> ChiSquareBall:
        r"""fast-dro ``RobustLoss(geometry='chi-square', size, reg)``, which uses
        :math:`\tfrac12\cdot\frac1n\sum(np_i-1)^2`: ``rho = 2 size``, ``lam = reg / 2``."""
        return cls(2.0 * _finite("size", size), lam=0.5 * _finite("reg", reg))

    @classmethod
    def from_dro(cls, eps: float, *, neural: bool = False) -> ChiSquareBall:
        """The ``dro`` package: ``Chi2DRO(eps)`` (linear models) uses this convention;
        ``Chi2NNDRO`` (``neural=True``) uses half of it, so ``rho = 2 eps``."""
        e = _finite("eps", eps)
        return cls(2.0 * e if neural else e)


@dataclasses.dataclass(frozen=True)
class ChiSquarePenalty(DROSpec):
    r""":math:`\chi^2` penalty :math:`\max_p \langle p,\ell\rangle - \lambda\frac1n\sum_i(np_i-1)^2`.

    The maximiser is exactly a Euclidean simplex projection,
    :math:`p = \Pi_{\Delta_n}\big(u + \ell/(2\lambda n)\big)`, computed by a sort.

    Args:
        lam: Penalty :math:`\lambda > 0`.

    Example:
        Here :math:`u + \ell/(2\lambda n)` = (0.375, 0.5, 0.625, 0.75), whose simplex projection
        subtracts 0.3125 from each entry:

        >>> import torch
        >>> from optlayers.solvers.dro import ChiSquarePenalty, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, ChiSquarePenalty(1.0))
        >>> p = res.solution
        >>> p.tolist()
        [0.0625, 0.1875, 0.3125, 0.4375]
        >>> float(res.aux.value), float(p @ losses - 1.0 * ((4 * p - 1) ** 2).mean())
        (2.8125, 2.8125)
    """

    lam: float

    def __post_init__(self) -> None:
        lam = _finite("lam", self.lam)
        if lam <= 0:
            raise ValueError(f"ChiSquarePenalty lam must be > 0, got {lam}")
        _set(self, "lam", lam)

    @classmethod
    def from_fastdro(cls, reg: float) -> ChiSquarePenalty:
        r"""fast-dro ``RobustLoss(geometry='chi-square', size=inf, reg)`` penalises
        :math:`\tfrac{reg}{2}\cdot\frac1n\sum(np_i-1)^2`: ``lam = reg / 2``."""
        return cls(0.5 * _finite("reg", reg))


@dataclasses.dataclass(frozen=True)
class KLBall(DROSpec):
    r"""KL ball :math:`\mathrm{KL}(p\,\|\,u) \le \rho`.

    .. math:: \max_{\mathrm{KL}(p\|u)\le\rho}\langle p,\ell\rangle
              = \min_{\lambda>0}\ \lambda\rho + \lambda\log\frac1n\sum_i e^{\ell_i/\lambda},
              \qquad p = \mathrm{softmax}(\ell/\lambda^\star).

    :math:`\lambda^\star` solves :math:`\mathrm{KL}(\mathrm{softmax}(\ell/\lambda)\|u) = \rho`
    (monotone in :math:`\lambda`) by safeguarded Newton–bisection in :math:`\log\lambda`; the
    returned weights are on the feasible side. :math:`\rho \ge \log(n/m)` (``m`` losses tied at
    the max) gives the max.

    Args:
        rho: Radius :math:`\rho \ge 0`.

    Example:
        The weights are :math:`\mathrm{softmax}(\ell/\lambda^\star)` (``lam`` of the duals) and
        their KL divergence from uniform is the radius:

        >>> import torch
        >>> from optlayers.solvers.dro import KLBall, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, KLBall(0.1))
        >>> p = res.solution
        >>> torch.allclose(p, torch.softmax(losses / res.aux.dual.lam, dim=-1))
        True
        >>> round(float((p * (4 * p).log()).sum()), 8), round(float(res.aux.value), 6)
        (0.1, 2.994274)
    """

    rho: float

    def __post_init__(self) -> None:
        r = _finite("rho", self.rho)
        if r < 0:
            raise ValueError(f"KLBall rho must be >= 0, got {r}")
        _set(self, "rho", r)


@dataclasses.dataclass(frozen=True)
class KLPenalty(DROSpec):
    r"""KL penalty :math:`\max_p \langle p,\ell\rangle - \lambda\,\mathrm{KL}(p\|u)
    = \lambda\log\frac1n\sum_i e^{\ell_i/\lambda}`, :math:`p = \mathrm{softmax}(\ell/\lambda)`.

    With ``optimistic=True`` the sign flips (Dr. DPO):
    :math:`\min_p \langle p,\ell\rangle + \lambda\,\mathrm{KL}(p\|u)
    = -\lambda\log\frac1n\sum_i e^{-\ell_i/\lambda}`, weights
    :math:`\mathrm{softmax}(-\ell/\lambda)` that *down*-weight large losses.

    Args:
        lam: Temperature :math:`\lambda > 0`.
        optimistic: Minimise instead of maximise over :math:`p` (keyword only).

    Example:
        >>> import math
        >>> import torch
        >>> from optlayers.solvers.dro import KLPenalty, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> res = robust_weights(losses, KLPenalty(0.5))
        >>> torch.allclose(res.solution, torch.softmax(losses / 0.5, dim=-1))
        True
        >>> torch.isclose(res.aux.value, 0.5 * (torch.logsumexp(losses / 0.5, 0) - math.log(4)))
        tensor(True)
        >>> opt = robust_weights(losses, KLPenalty(0.5, optimistic=True))  # down-weights large losses
        >>> torch.allclose(opt.solution, torch.softmax(-losses / 0.5, dim=-1))
        True
    """

    lam: float
    optimistic: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        lam = _finite("lam", self.lam)
        if lam <= 0:
            raise ValueError(f"KLPenalty lam must be > 0, got {lam}")
        _set(self, "lam", lam)
        _set(self, "optimistic", bool(self.optimistic))


@dataclasses.dataclass(frozen=True)
class CressieRead(DROSpec):
    r"""Cressie–Read :math:`f`-divergence ball or penalty (Duchi & Namkoong's family).

    .. math:: f_k(t) = \frac{t^k - kt + k - 1}{k(k-1)},\qquad
              D_k(p) = \frac1n\sum_i f_k(np_i),\qquad
              f_k^*(s) = \frac1k\big[((k-1)s+1)_+^{k/(k-1)} - 1\big].

    Ball: :math:`\min_{\lambda\ge0,\eta}\lambda\rho + \eta + \lambda\frac1n\sum_i
    f_k^*((\ell_i-\eta)/\lambda)`; penalty: the same with :math:`\lambda` fixed and no
    :math:`\lambda\rho`. Weights :math:`p_i \propto (\ell_i - \tilde\eta)_+^{1/(k-1)}`; the
    threshold is found by safeguarded Newton–bisection (exact sort for ``k = 2``).
    ``k = 2`` is *half* the :math:`\chi^2` of :class:`ChiSquareBall`:
    ``CressieRead(2, rho=r)`` equals ``ChiSquareBall(2 r)``; ``k -> 1`` tends to KL.

    Args:
        k: Exponent :math:`k > 1`.
        rho: Ball radius (keyword only); exactly one of ``rho`` and ``lam``.
        lam: Penalty strength :math:`> 0` (keyword only).

    Example:
        ``k = 2`` is half the :math:`\chi^2` divergence, and ``k = 3`` gives
        :math:`p_i \propto (\ell_i - \tilde\eta)_+^{1/2}`:

        >>> import torch
        >>> from optlayers.solvers.dro import ChiSquareBall, CressieRead, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> cr = robust_weights(losses, CressieRead(2, rho=0.5))
        >>> torch.allclose(cr.solution, robust_weights(losses, ChiSquareBall(1.0)).solution)
        True
        >>> p = robust_weights(losses, CressieRead(3, lam=1.0)).solution
        >>> [round(v, 4) for v in p.tolist()]
        [0.0, 0.1151, 0.3718, 0.5131]
    """

    k: float
    rho: float | None = dataclasses.field(default=None, kw_only=True)
    lam: float | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        k = _finite("k", self.k)
        if k <= 1.0:
            raise ValueError(f"CressieRead k must be > 1 (use KLBall/KLPenalty for k -> 1), got {k}")
        _set(self, "k", k)
        if (self.rho is None) == (self.lam is None):
            raise ValueError("CressieRead takes exactly one of rho= (ball) and lam= (penalty)")
        if self.rho is not None:
            r = _finite("rho", self.rho)
            if r < 0:
                raise ValueError(f"CressieRead rho must be >= 0, got {r}")
            _set(self, "rho", r)
        else:
            lam = _finite("lam", self.lam)  # type: ignore[arg-type]
            if lam <= 0:
                raise ValueError(f"CressieRead lam must be > 0, got {lam}")
            _set(self, "lam", lam)


# ----------------------------------------------------------------------------------------------
# Spectral risk measures
# ----------------------------------------------------------------------------------------------


class Spectrum:
    r"""A spectrum: non-decreasing weights :math:`\sigma_1 \le \dots \le \sigma_n` summing to 1,
    :math:`\sigma_i` applied to the :math:`i`-th *smallest* loss.

    The spectral risk of losses :math:`\ell` is
    :math:`R_\sigma(\ell) = \sum_i \sigma_i \ell_{(i)}` with
    :math:`\ell_{(1)} \le \dots \le \ell_{(n)}`. Subclasses implement :meth:`weights`.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import Spectrum, extremile
        >>> sigma = extremile(2.0)
        >>> isinstance(sigma, Spectrum), sigma.weights(4).tolist()
        (True, [0.0625, 0.1875, 0.3125, 0.4375])
        >>> losses = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
        >>> float(sigma.weights(4) @ losses.sort().values)
        3.125
    """

    def weights(self, n: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
        """The ``n`` weights in ascending order."""
        raise NotImplementedError

    def cached_weights(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """:meth:`weights`, memoised per ``(spectrum, n, dtype, device)`` (read-only use)."""
        return _cached_weights(self, n, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_weights(spectrum: Spectrum, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # built outside any torch.func transform: under one, factory ops return wrapped tensors that
    # would outlive their transform in the cache
    with torch._C._DisableFuncTorch():
        return spectrum.weights(n, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class Superquantile(Spectrum):
    r"""Superquantile (CVaR) at quantile level ``q``: weight :math:`1/(n(1-q))` on the top
    :math:`(1-q)n` losses, with one fractional atom. ``Superquantile(q)`` = ``CVaR(1 - q)``.

    .. math:: \sigma_i = \frac{1}{(1-q)n}\Big[\min\big(n - i + 1,\ (1-q)n\big) - (n - i)\Big]_+ .

    Example:
        >>> from optlayers.solvers.dro import Superquantile
        >>> Superquantile(0.5).weights(4).tolist()
        [0.0, 0.0, 0.5, 0.5]
        >>> Superquantile(0.75).weights(4).tolist()
        [0.0, 0.0, 0.0, 1.0]
    """

    q: float

    def __post_init__(self) -> None:
        q = _finite("q", self.q)
        if not 0.0 <= q < 1.0:
            raise ValueError(f"superquantile level q must be in [0, 1), got {q}")
        _set(self, "q", q)

    def weights(self, n: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
        k = (1.0 - self.q) * n
        i = torch.arange(1, n + 1, dtype=torch.float64, device=device)  # rank from the top
        desc = (torch.clamp(torch.minimum(i, torch.tensor(k, dtype=torch.float64, device=device)) - (i - 1),
                            min=0.0)) / k
        return desc.flip(0).to(dtype)


@dataclasses.dataclass(frozen=True)
class Extremile(Spectrum):
    r"""Extremile of order ``r >= 1``: :math:`\sigma_i = (i^r - (i-1)^r)/n^r`
    (``r = 1`` is the mean).

    Example:
        >>> from optlayers.solvers.dro import Extremile
        >>> Extremile(2.0).weights(4).tolist()
        [0.0625, 0.1875, 0.3125, 0.4375]
        >>> Extremile(1.0).weights(4).tolist()
        [0.25, 0.25, 0.25, 0.25]
    """

    r: float

    def __post_init__(self) -> None:
        r = _finite("r", self.r)
        if r < 1.0:
            raise ValueError(f"extremile order r must be >= 1 (a non-decreasing spectrum), got {r}")
        _set(self, "r", r)

    def weights(self, n: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
        i = torch.arange(0, n + 1, dtype=torch.float64, device=device) / n
        c = i ** self.r
        return (c[1:] - c[:-1]).to(dtype)


@dataclasses.dataclass(frozen=True)
class ESRM(Spectrum):
    r"""Exponential spectral risk measure of aversion ``rho > 0``:
    :math:`\sigma_i = e^{-\rho}(e^{\rho i/n} - e^{\rho(i-1)/n})/(1 - e^{-\rho})`.

    Example:
        >>> import math
        >>> import torch
        >>> from optlayers.solvers.dro import ESRM
        >>> w = ESRM(1.0).weights(4)
        >>> i = torch.arange(1, 5, dtype=torch.float64)
        >>> ref = math.exp(-1.0) * (torch.exp(i / 4) - torch.exp((i - 1) / 4)) / (1 - math.exp(-1.0))
        >>> torch.allclose(w, ref), round(float(w.sum()), 12)
        (True, 1.0)
    """

    rho: float

    def __post_init__(self) -> None:
        r = _finite("rho", self.rho)
        if r <= 0:
            raise ValueError(f"esrm rho must be > 0, got {r}")
        _set(self, "rho", r)

    def weights(self, n: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
        i = torch.arange(0, n + 1, dtype=torch.float64, device=device) / n
        # e^{-rho}(e^{rho i/n} - e^{rho (i-1)/n}) = e^{rho(i/n - 1)} - e^{rho((i-1)/n - 1)}
        c = torch.expm1(self.rho * (i - 1.0)) + 1.0
        w = (c[1:] - c[:-1]) / (-math.expm1(-self.rho))
        return w.to(dtype)


@dataclasses.dataclass(frozen=True)
class CustomSpectrum(Spectrum):
    r"""A user spectrum: ``values`` non-decreasing, non-negative, summing to 1 (length ``n``).

    :math:`\sigma_i` = ``values[i - 1]``; it only applies to exactly ``n = len(values)`` losses.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import CustomSpectrum, Spectral, robust_weights
        >>> sigma = CustomSpectrum((0.1, 0.2, 0.3, 0.4))
        >>> sigma.weights(4).tolist()
        [0.1, 0.2, 0.3, 0.4]
        >>> losses = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
        >>> robust_weights(losses, Spectral(sigma)).solution.tolist()  # sigma_i to the i-th smallest
        [0.4, 0.1, 0.3, 0.2]
    """

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        vals = tuple(_finite("spectrum value", v) for v in self.values)
        if not vals:
            raise ValueError("a custom spectrum needs at least one value")
        if min(vals) < 0:
            raise ValueError("spectrum values must be >= 0")
        if any(b < a - 1e-12 for a, b in zip(vals[:-1], vals[1:], strict=True)):
            raise ValueError("spectrum values must be non-decreasing (sigma_i weights the i-th smallest loss)")
        if abs(sum(vals) - 1.0) > 1e-9:
            raise ValueError(f"spectrum values must sum to 1, got {sum(vals)}")
        _set(self, "values", vals)

    def weights(self, n: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
        if n != len(self.values):
            raise ValueError(f"custom spectrum has {len(self.values)} values but there are {n} losses")
        return torch.tensor(self.values, dtype=dtype, device=device)


def superquantile(q: float) -> Superquantile:
    r"""Superquantile spectrum at quantile level ``q`` (the worst ``1 - q`` fraction).

    :math:`R_\sigma(\ell)` is then :math:`\mathrm{CVaR}_{1-q}(\ell)`, the mean of the worst
    :math:`(1-q)n` losses (see :class:`Superquantile`).

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import CVaR, Spectral, robust_weights, superquantile
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> a = robust_weights(losses, Spectral(superquantile(0.7))).aux.value
        >>> b = robust_weights(losses, CVaR(0.3)).aux.value
        >>> bool(torch.isclose(a, b)), round(float(a), 6)
        (True, 3.833333)
    """
    return Superquantile(q)


def extremile(r: float) -> Extremile:
    r"""Extremile spectrum of order ``r``: :math:`\sigma_i = (i^r - (i-1)^r)/n^r` (see
    :class:`Extremile`); :math:`R_\sigma(\ell)` is the expected maximum of ``r`` i.i.d. draws from
    the losses when ``r`` is an integer.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import Spectral, extremile, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> value = robust_weights(losses, Spectral(extremile(2.0))).aux.value
        >>> pairs = torch.maximum(losses[:, None], losses[None, :]).mean()  # E max of two draws
        >>> float(value), float(pairs)
        (3.125, 3.125)
    """
    return Extremile(r)


def esrm(rho: float) -> ESRM:
    r"""Exponential spectral risk measure with aversion ``rho``:
    :math:`\sigma_i = e^{-\rho}(e^{\rho i/n} - e^{\rho(i-1)/n})/(1 - e^{-\rho})` (see :class:`ESRM`).

    Example:
        Larger aversion puts more weight on the largest loss:

        >>> from optlayers.solvers.dro import esrm
        >>> [round(float(esrm(rho).weights(4)[-1]), 4) for rho in (0.5, 1.0, 4.0)]
        [0.2986, 0.3499, 0.6439]
    """
    return ESRM(rho)


@dataclasses.dataclass(frozen=True)
class Spectral(DROSpec):
    r"""Spectral risk :math:`R_\sigma(\ell) = \sum_i \sigma_i \ell_{(i)}` with an optional penalty.

    .. math:: \max_{q \in \mathcal{P}(\sigma)} \langle q,\ell\rangle - \lambda D(q)

    over the permutahedron :math:`\mathcal{P}(\sigma)` (all weightings that majorise like
    :math:`\sigma`), :math:`D` the :math:`\chi^2` divergence :math:`\frac1n\sum(nq_i-1)^2`
    (``divergence="chi2"``) or :math:`\mathrm{KL}(q\|u)` (``"kl"``). Computed exactly by a sort
    and pool-adjacent-violators (Mehta et al., ICLR 2024). Prospect's ``shift_cost`` ``ν`` with
    ``penalty="l2"`` penalises :math:`\frac{\nu n}{2}\lVert q-u\rVert^2`: ``lam = ν / 2``
    (see :meth:`from_prospect`).

    Args:
        sigma: A :class:`Spectrum` (``superquantile(q)``, ``extremile(r)``, ``esrm(rho)``) or a
            sequence of ``n`` ascending weights.
        lam: Penalty :math:`\lambda \ge 0` (0: the plain spectral risk).
        divergence: ``"chi2"`` or ``"kl"``.

    Example:
        Without a penalty the weights are the spectrum in the order of the losses; a penalty pulls
        them towards uniform:

        >>> import torch
        >>> from optlayers.solvers.dro import Spectral, extremile, robust_weights
        >>> losses = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
        >>> robust_weights(losses, Spectral(extremile(2.0))).solution.tolist()
        [0.4375, 0.0625, 0.3125, 0.1875]
        >>> p = robust_weights(losses, Spectral(extremile(2.0), lam=10.0)).solution
        >>> [round(v, 5) for v in p.tolist()]
        [0.26875, 0.23125, 0.25625, 0.24375]
    """

    sigma: Spectrum
    lam: float = dataclasses.field(default=0.0, kw_only=True)
    divergence: Literal["chi2", "kl"] = dataclasses.field(default="chi2", kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.sigma, Spectrum):
            if isinstance(self.sigma, torch.Tensor):
                _set(self, "sigma", CustomSpectrum(tuple(self.sigma.detach().cpu().double().tolist())))
            elif isinstance(self.sigma, Sequence):
                _set(self, "sigma", CustomSpectrum(tuple(self.sigma)))
            else:
                raise TypeError("sigma must be a Spectrum (superquantile/extremile/esrm) or a sequence")
        lam = _finite("lam", self.lam)
        if lam < 0:
            raise ValueError(f"Spectral lam must be >= 0, got {lam}")
        _set(self, "lam", lam)
        if self.divergence not in ("chi2", "kl"):
            raise ValueError(f"Spectral divergence must be 'chi2' or 'kl', got {self.divergence!r}")
        if self.divergence == "kl" and lam == 0:
            _set(self, "divergence", "chi2")  # no penalty: the divergence is irrelevant

    @classmethod
    def from_prospect(cls, sigma: Spectrum, shift_cost: float,
                      penalty: Literal["l2", "neg_entropy"] = "l2") -> Spectral:
        """Prospect's ``(spectrum, shift_cost, penalty)``: l2 uses ``lam = shift_cost / 2``,
        ``neg_entropy`` uses ``lam = shift_cost`` with the KL divergence."""
        sc = _finite("shift_cost", shift_cost)
        if penalty == "l2":
            return cls(sigma, lam=sc / 2.0, divergence="chi2")
        if penalty == "neg_entropy":
            return cls(sigma, lam=sc, divergence="kl")
        raise ValueError(f"penalty must be 'l2' or 'neg_entropy', got {penalty!r}")


@dataclasses.dataclass(frozen=True)
class HolisticRobust(DROSpec):
    r"""Holistic robustness (Bennouna, Lucas & Van Parys): poisoning budget ``alpha`` and KL
    radius ``r``.

    With an extra atom carrying :math:`v_{n+1} = \max_i \ell_i`,

    .. math:: \max_{p,\,q \in \Delta_{n+1}} \langle p, v\rangle \quad\text{s.t.}\quad
              q_i = \tfrac1n - s_i,\ s \ge 0,\ \textstyle\sum_i s_i \le \alpha,\quad
              \mathrm{KL}(q\,\|\,p) \le r .

    Closed form: the budget moves :math:`\alpha` mass from the smallest losses to the extra atom
    (a sort); then :math:`p_i = \lambda q_i / (\eta^\star - v_i)` where :math:`\eta^\star`
    minimises the 1-D convex :math:`\eta - e^{-r}\exp(\sum_i q_i\log(\eta - v_i))`, found by
    safeguarded Newton–bisection. The extra atom's weight is given to the maximal loss(es), so
    the weights returned are over the ``n`` losses. ``HolisticRobust(a, 0)`` is
    ``TotalVariation(a)``; ``HolisticRobust(0, 0)`` is the mean. Evasion (the :math:`\varepsilon`
    of the paper) is applied by passing adversarial losses.

    Args:
        alpha: Poisoning budget in [0, 1].
        r: KL radius :math:`\ge 0`.

    Example:
        With ``r = 0`` it is the total-variation ball; a KL radius makes it more pessimistic:

        >>> import torch
        >>> from optlayers.solvers.dro import HolisticRobust, TotalVariation, robust_weights
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> hr = robust_weights(losses, HolisticRobust(0.25, 0.0))
        >>> hr.solution.tolist() == robust_weights(losses, TotalVariation(0.25)).solution.tolist()
        True
        >>> res = robust_weights(losses, HolisticRobust(0.25, 0.1))
        >>> bool(res.converged), bool(res.aux.value > hr.aux.value), round(float(res.aux.divergence), 8)
        (True, True, 0.1)
    """

    alpha: float
    r: float

    def __post_init__(self) -> None:
        a = _finite("alpha", self.alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"HolisticRobust alpha must be in [0, 1], got {a}")
        r = _finite("r", self.r)
        if r < 0:
            raise ValueError(f"HolisticRobust r must be >= 0, got {r}")
        _set(self, "alpha", a)
        _set(self, "r", r)

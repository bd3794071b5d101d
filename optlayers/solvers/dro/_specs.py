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
    """Base class of every uncertainty-set spec (frozen dataclasses)."""


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
    """A spectrum: non-decreasing weights :math:`\\sigma_1 \\le \\dots \\le \\sigma_n` summing to 1,
    :math:`\\sigma_i` applied to the :math:`i`-th *smallest* loss."""

    def weights(self, n: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
        """The ``n`` weights in ascending order."""
        raise NotImplementedError

    def cached_weights(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """:meth:`weights`, memoised per ``(spectrum, n, dtype, device)`` (read-only use)."""
        return _cached_weights(self, n, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_weights(spectrum: Spectrum, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return spectrum.weights(n, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class Superquantile(Spectrum):
    r"""Superquantile (CVaR) at quantile level ``q``: weight :math:`1/(n(1-q))` on the top
    :math:`(1-q)n` losses, with one fractional atom. ``Superquantile(q)`` = ``CVaR(1 - q)``."""

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
    (``r = 1`` is the mean)."""

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
    :math:`\sigma_i = e^{-\rho}(e^{\rho i/n} - e^{\rho(i-1)/n})/(1 - e^{-\rho})`."""

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
    """A user spectrum: ``values`` non-decreasing, non-negative, summing to 1 (length ``n``)."""

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
    """Superquantile spectrum at quantile level ``q`` (the worst ``1 - q`` fraction)."""
    return Superquantile(q)


def extremile(r: float) -> Extremile:
    """Extremile spectrum of order ``r``."""
    return Extremile(r)


def esrm(rho: float) -> ESRM:
    """Exponential spectral risk measure with aversion ``rho``."""
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

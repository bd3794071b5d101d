r"""Residuals of 1-D time-dependent PDEs for physics-informed layers.

Each problem is a frozen dataclass with

* ``interior(f)``: the PDE residual from the fields ``f = Fields(u, u_t, u_x, u_xx)``;
* ``left(f)`` / ``right(f)``: boundary residuals at ``x_min`` / ``x_max``;
* ``initial_condition(a, x)``: a family of initial conditions ``u₀(x; a)`` indexed by a few
  coefficients ``a`` (``sample_coefficients`` draws them), used to build train and test sets;
* ``grid(nx, nt)``: the problem's space–time domain on a uniform grid.

Problems (the reference solutions are in :mod:`optlayers.solvers.pde.reference`):

* :class:`Heat` — ``u_t = ν u_xx`` on ``[0,1]``, ``u(0,t) = u(1,t) = 0``,
  ``u₀ = Σₖ aₖ sin(kπx)``; exact solution ``Σₖ aₖ e^{-νk²π²t} sin(kπx)``.
* :class:`Burgers` — viscous Burgers ``u_t + u u_x = ν u_xx``, same boundary and initial data.
* :class:`DiffusionSorption` — PDEBench's diffusion–sorption problem (Takamoto et al., 2022)

  .. math::
      R(u)\,u_t = D\,u_{xx},\qquad R(u) = 1 + \frac{1-φ}{φ} ρ_s k n_f u^{n_f-1},
      \qquad u(0,t) = 1,\quad u(1,t) = D\,u_x(1,t),

  with ``D = 5·10⁻⁴``, ``φ = 0.29``, ``ρ_s = 2880``, ``k = 3.5·10⁻⁴``, ``n_f = 0.874`` and
  ``t ∈ [0, 500]`` s. The residual is multiplied by ``t_max`` so that its rows are O(1), like
  the initial and boundary rows.

Residuals broadcast over any leading dimensions and are written in differentiable,
``torch.func``-transformable PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .finite_difference import Grid

__all__ = ["Fields", "Partials", "PDE1D", "Heat", "Burgers", "DiffusionSorption", "sample_coefficients"]


class Fields(NamedTuple):
    """A field and its derivatives at some points: ``u, u_t, u_x, u_xx`` (same shapes).

    The jet ``(u, ∂u/∂t, ∂u/∂x, ∂²u/∂x²)`` that every residual of a :class:`PDE1D` is written in,
    e.g. ``𝓕 = u_t − ν u_xx`` for :class:`Heat`; build it from a gridded field with
    :func:`~optlayers.solvers.pde.space_time_derivatives`.

    Example:
        The exact heat solution has a near-zero finite-difference residual inside the domain:

        >>> import torch
        >>> from optlayers.solvers.pde import Heat, heat_exact, space_time_derivatives
        >>> pde = Heat(); grid = pde.grid(64, 64)
        >>> u = heat_exact(pde, torch.tensor([[1.0, 0.5]], dtype=torch.float64), grid)
        >>> f = Fields(*space_time_derivatives(u, grid))
        >>> f.u_xx.shape, float(pde.interior(f)[..., 1:-1, 1:].abs().max()) < 2e-3
        (torch.Size([1, 64, 64]), True)
    """

    u: torch.Tensor
    u_t: torch.Tensor
    u_x: torch.Tensor
    u_xx: torch.Tensor


def sample_coefficients(n: int, modes: int = 4, *, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Draw initial-condition coefficients ``aₖ ~ U(-1, 1) / k`` for ``k = 1..modes``.

    The ``1/k`` decay makes ``u₀ = Σₖ aₖ sin(kπx)`` smooth (``|aₖ| ≤ 1/k``), so that higher modes,
    which the coarse grids resolve worst, carry less energy.

    Args:
        n: Number of initial conditions.
        modes: Number of coefficients per initial condition.
        generator: Random generator (``None``: torch's global one).
        dtype: Floating dtype.

    Returns:
        ``(n, modes)``.

    Raises:
        ValueError: ``n < 0`` or ``modes < 1``.

    Example:
        >>> import torch
        >>> a = sample_coefficients(3, 4, generator=torch.Generator().manual_seed(0))
        >>> a.shape, bool((a.abs() * torch.arange(1, 5) <= 1).all())
        (torch.Size([3, 4]), True)
    """
    if n < 0 or modes < 1:
        raise ValueError(f"need n >= 0 and modes >= 1, got n={n}, modes={modes}")
    a = 2 * torch.rand(n, modes, generator=generator, dtype=dtype) - 1
    return a / torch.arange(1, modes + 1, dtype=dtype)


def _sine_series(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    k = torch.arange(1, a.shape[-1] + 1, dtype=a.dtype, device=a.device)
    return torch.einsum("...k,xk->...x", a, torch.sin(math.pi * x[:, None].to(a.dtype) * k))


Partials = tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, torch.Tensor]]]
"""``(𝓕, ∇𝓕, [(a, b, ∂²𝓕/∂f_a∂f_b)])``: an interior residual with its partial derivatives.

``𝓕`` has the points' shape; ``∇𝓕`` stacks ``∂𝓕/∂(u, u_t, u_x, u_xx)`` on a last axis of 4; the
list holds the second partials that are not identically zero, indexed ``a, b ∈ {0, 1, 2, 3}`` in
the same order (see :meth:`PDE1D.interior_partials`)."""


class PDE1D:
    r"""Interface of a 1-D time-dependent problem (see the module docstring).

    A problem on ``[x_min, x_max] × [0, t_max]`` is the set of residuals

    .. math::
        𝓕(u, u_t, u_x, u_{xx}) = 0 \text{ inside},\quad 𝓑_{left}(u, u_x) = 0 \text{ at } x_{min},
        \quad 𝓑_{right}(u, u_x) = 0 \text{ at } x_{max},\quad u(x, 0) = u_0(x; a),

    written by a subclass as ``interior``, ``left``, ``right`` and ``initial_condition``; each
    takes :class:`Fields` and broadcasts over any leading dimensions. ``linear = True`` declares
    ``𝓕`` linear in the fields; ``interior_partials`` may return the closed-form partials
    (:data:`Partials`) to spare the solvers an autograd pass.

    Example:
        A decay equation ``u_t + κu = 0`` with ``u = 0`` at both ends and ``u₀ = a₁ sin(πx)``,
        whose solution is ``a₁ sin(πx) e^{−κt}``:

        >>> import dataclasses, math, torch
        >>> from optlayers.solvers.pde import Fields, space_time_derivatives
        >>> @dataclasses.dataclass(frozen=True)
        ... class Decay(PDE1D):
        ...     kappa: float = 2.0
        ...     linear = True
        ...     def interior(self, f):
        ...         return f.u_t + self.kappa * f.u
        ...     def left(self, f):
        ...         return f.u
        ...     def right(self, f):
        ...         return f.u
        ...     def initial_condition(self, a, x):
        ...         return a[..., :1] * torch.sin(math.pi * x)
        >>> pde = Decay(); grid = pde.grid(101, 101)
        >>> x, t = grid.coords()
        >>> u = pde.initial_condition(torch.ones(1, dtype=torch.float64), x)[:, None] * torch.exp(-pde.kappa * t)
        >>> f = Fields(*space_time_derivatives(u, grid))
        >>> float(pde.interior(f).abs().max()) < 1e-3, float(pde.right(f)[-1].abs().max()) < 1e-12
        (True, True)
    """

    #: True when the interior residual is linear in ``(u, u_t, u_x, u_xx)``.
    linear: bool = False
    x_min: float = 0.0
    x_max: float = 1.0
    t_max: float = 1.0

    def interior(self, f: Fields) -> torch.Tensor:
        """PDE residual at interior points."""
        raise NotImplementedError

    def interior_partials(self, f: Fields) -> Partials | None:
        """Optional closed form of ``interior`` with its partials (solvers fall back to autograd on None).

        Returns:
            ``(𝓕, ∂𝓕/∂(u, u_t, u_x, u_xx) stacked last (…, 4), [(a, b, ∂²𝓕/∂f_a∂f_b)])`` listing the
            second partials that are not identically zero.
        """
        return None

    def left(self, f: Fields) -> torch.Tensor:
        """Boundary residual at ``x = x_min``."""
        raise NotImplementedError

    def right(self, f: Fields) -> torch.Tensor:
        """Boundary residual at ``x = x_max``."""
        raise NotImplementedError

    def initial_condition(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``u₀(x; a)``: ``a (*batch, modes)``, ``x (nx,)`` -> ``(*batch, nx)``."""
        raise NotImplementedError

    def grid(self, nx: int, nt: int) -> Grid:
        """A uniform grid on the problem's domain ``[x_min, x_max] × [0, t_max]``."""
        return Grid(nx, nt, x_min=self.x_min, x_max=self.x_max, t_max=self.t_max)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"{type(obj).__name__}: {name} must be a positive finite number, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Heat(PDE1D):
    r"""Heat equation ``u_t − ν u_xx = 0`` on ``[0, 1] × [0, t_max]`` with ``u = 0`` at both ends.

    Initial conditions ``u₀ = Σₖ aₖ sin(kπx)``; the exact solution is
    ``Σₖ aₖ exp(−ν k² π² t) sin(kπx)`` (:func:`~optlayers.solvers.pde.reference.heat_exact`).

    Attributes:
        nu: Diffusivity ``ν`` (default 0.05).
        t_max: Final time (default 1).

    Example:
        >>> pde = Heat()
        >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> pde.initial_condition(torch.tensor([[1.0, 0.0]], dtype=torch.float64), x).shape
        torch.Size([1, 5])
    """

    nu: float = 0.05
    t_max: float = dataclasses.field(default=1.0, kw_only=True)
    linear = True

    def __post_init__(self) -> None:
        _positive(self, "nu", "t_max")

    def interior(self, f: Fields) -> torch.Tensor:
        return f.u_t - self.nu * f.u_xx

    def left(self, f: Fields) -> torch.Tensor:
        return f.u

    def right(self, f: Fields) -> torch.Tensor:
        return f.u

    def initial_condition(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _sine_series(a, x)


@dataclasses.dataclass(frozen=True)
class Burgers(PDE1D):
    r"""Viscous Burgers ``u_t + u u_x − ν u_xx = 0`` on ``[0, 1] × [0, t_max]``, ``u = 0`` at both ends.

    Nonlinear in ``u`` (the advection term), so hard-constraint solves are nonlinear least
    squares. Initial conditions ``u₀ = Σₖ aₖ sin(kπx)``; reference by
    :func:`~optlayers.solvers.pde.reference.burgers_reference`.

    Attributes:
        nu: Viscosity ``ν`` (default 0.02).
        t_max: Final time (default 1).

    Example:
        ``u = x / (1 + t)`` solves ``u_t + u u_x = 0`` with ``u_xx = 0``, so its residual vanishes
        (it does not meet the right boundary condition, ``u(1, t) ≠ 0``):

        >>> import torch
        >>> from optlayers.solvers.pde import Fields
        >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
        >>> t = torch.linspace(0, 1, 3, dtype=torch.float64)
        >>> u = x / (1 + t)
        >>> f = Fields(u, -x / (1 + t) ** 2, (1 / (1 + t)).expand_as(u), torch.zeros_like(u))
        >>> pde = Burgers()
        >>> torch.allclose(pde.interior(f), torch.zeros_like(u))
        True
        >>> torch.allclose(pde.interior_partials(f)[0], pde.interior(f))
        True
    """

    nu: float = 0.02
    t_max: float = dataclasses.field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        _positive(self, "nu", "t_max")

    def interior(self, f: Fields) -> torch.Tensor:
        return f.u_t + f.u * f.u_x - self.nu * f.u_xx

    def interior_partials(self, f: Fields) -> Partials:
        one = torch.ones_like(f.u)
        d = torch.stack([f.u_x, one, f.u, torch.full_like(f.u, -self.nu)], -1)
        return self.interior(f), d, [(0, 2, one), (2, 0, one)]

    def left(self, f: Fields) -> torch.Tensor:
        return f.u

    def right(self, f: Fields) -> torch.Tensor:
        return f.u

    def initial_condition(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _sine_series(a, x)


@dataclasses.dataclass(frozen=True)
class DiffusionSorption(PDE1D):
    r"""PDEBench diffusion–sorption: ``t_max·(R(u) u_t − D u_xx) = 0`` on ``[0, 1] × [0, t_max]``.

    .. math:: R(u) = 1 + \frac{1-φ}{φ}\, ρ_s\, k\, n_f\, u_+^{n_f - 1},\qquad
              u_+ = \tfrac12\big(u + \sqrt{u^2 + ε^2}\big),

    with ``u(0, t) = 1`` and ``u(1, t) = D u_x(1, t)``. ``u^{n_f−1}`` is singular at 0
    (``n_f < 1``) and undefined below, so ``R`` uses the smooth positive part ``u_+``
    (``ε = u_smooth``; ``u_+ = u`` to relative accuracy ``(ε/2u)²`` for ``u ≫ ε``). The slope
    ``R'(u) ∝ u^{n_f−2}`` is unbounded at 0 and a hard floor ``max(u, ε)`` puts a kink in the
    least-squares objective: either stalls Levenberg–Marquardt wherever a trial field dips to zero
    (near the right boundary the solution does). ``ε = 10⁻²`` (1% of the boundary value) keeps
    the inner solves at 15–20 iterations; ``10⁻⁴`` needs hundreds. The reference solver uses the
    same ``R``.
    Initial conditions: a front entering from the left boundary over a low random background,
    which the boundary value ``u(0, t) = 1`` keeps invading (PDEBench starts from a background
    that jumps to 1 at ``x = 0``; the front here makes the data compatible, so that a coarse
    finite-difference grid resolves them):

    .. math:: u_0(x; a) = (1 - x)\Big(e^{-6x} + 0.2\,(1 - e^{-6x})
              \big(1 + 0.45 \textstyle\sum_k a_k \sin(kπx)\big)\Big) > 0
              \quad (|a_k| \le 1/k).

    Attributes:
        D: Effective diffusion coefficient (5e-4).
        porosity: ``φ`` (0.29).
        rho_s: Bulk density ``ρ_s`` (2880).
        k_f: Freundlich parameter ``k`` (3.5e-4).
        n_f: Freundlich exponent (0.874).
        t_max: Final time in seconds (500).
        u_smooth: Smoothing ``ε`` of the positive part inside ``R(u)`` (1e-2).

    Example:
        >>> pde = DiffusionSorption()
        >>> round(float(pde.retardation(torch.tensor(1.0, dtype=torch.float64))), 4)
        3.1569
    """

    D: float = 5e-4
    porosity: float = 0.29
    rho_s: float = 2880.0
    k_f: float = 3.5e-4
    n_f: float = 0.874
    t_max: float = dataclasses.field(default=500.0, kw_only=True)
    u_smooth: float = dataclasses.field(default=1e-2, kw_only=True)

    def __post_init__(self) -> None:
        _positive(self, "D", "porosity", "rho_s", "k_f", "n_f", "t_max", "u_smooth")
        if not self.porosity < 1:
            raise ValueError(f"DiffusionSorption: porosity must be in (0, 1), got {self.porosity}")

    def retardation(self, u: torch.Tensor) -> torch.Tensor:
        """``R(u) = 1 + (1−φ)/φ · ρ_s k n_f · u_+^{n_f−1}`` with the smooth positive part ``u_+``."""
        c = (1 - self.porosity) / self.porosity * self.rho_s * self.k_f * self.n_f
        u_pos = 0.5 * (u + torch.sqrt(u * u + self.u_smooth ** 2))
        return 1 + c * u_pos ** (self.n_f - 1)

    def interior(self, f: Fields) -> torch.Tensor:
        return self.t_max * (self.retardation(f.u) * f.u_t - self.D * f.u_xx)

    def interior_partials(self, f: Fields) -> Partials:
        c = (1 - self.porosity) / self.porosity * self.rho_s * self.k_f * self.n_f
        m, u, eps2 = self.n_f - 1, f.u, self.u_smooth ** 2
        root = torch.sqrt(u * u + eps2)
        up = 0.5 * (u + root)  # smooth positive part and its derivatives
        dp, d2p = 0.5 * (1 + u / root), 0.5 * eps2 / root ** 3
        R = 1 + c * up ** m
        dR = c * m * up ** (m - 1) * dp
        d2R = c * m * ((m - 1) * up ** (m - 2) * dp * dp + up ** (m - 1) * d2p)
        T = self.t_max
        d = torch.stack([T * dR * f.u_t, T * R, torch.zeros_like(u), torch.full_like(u, -T * self.D)], -1)
        return T * (R * f.u_t - self.D * f.u_xx), d, [(0, 0, T * d2R * f.u_t), (0, 1, T * dR), (1, 0, T * dR)]

    def left(self, f: Fields) -> torch.Tensor:
        return f.u - 1

    def right(self, f: Fields) -> torch.Tensor:
        return f.u - self.D * f.u_x

    def initial_condition(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.to(a.dtype)
        front = torch.exp(-6 * x)
        return (1 - x) * (front + 0.2 * (1 - front) * (1 + 0.45 * _sine_series(a, x)))

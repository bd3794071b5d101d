r"""Reference solutions for the 1-D problems of :mod:`optlayers.solvers.pde.residuals`.

* :func:`heat_exact` — the closed form of the heat equation with a sine-series initial condition.
* :func:`burgers_reference` and :func:`diffusion_sorption_reference` — method of lines on a fine
  grid (second-order central differences in space, conservative flux ``(u²/2)_x`` for Burgers),
  integrated in time by SciPy's BDF with a banded Jacobian sparsity and tight tolerances, then
  interpolated linearly in space onto the coarse grid (whose ``t = 0`` column is the exact initial
  condition). For diffusion–sorption the Robin condition
  ``u(1) = D u_x(1)`` is imposed with a second-order one-sided difference and ``u(0) = 1`` directly.
* :func:`reference_solution` dispatches on the problem type; :func:`relative_l2_error` is the
  error measure of the paper (``‖u − u_ref‖₂ / ‖u_ref‖₂`` per sample over the whole grid).

These are small CPU solvers meant to measure errors of learned solutions at the resolutions of
tests and examples (fine grids of a few hundred points), not fast PDE solvers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.integrate
import scipy.sparse
import torch

from .finite_difference import Grid
from .residuals import PDE1D, Burgers, DiffusionSorption, Heat

__all__ = ["heat_exact", "burgers_reference", "diffusion_sorption_reference", "reference_solution",
           "relative_l2_error"]


def heat_exact(pde: Heat, a: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Exact solution ``Σₖ aₖ exp(−ν k² π² t) sin(kπx)`` of :class:`Heat` on ``grid``.

    Args:
        pde: The heat problem (``x ∈ [0, 1]``).
        a: Coefficients ``(*batch, modes)``.
        grid: The grid.

    Returns:
        ``(*batch, nx, nt)``.

    Example:
        One mode decays at the rate ``νπ²``:

        >>> import math, torch
        >>> from optlayers.solvers.pde import Heat
        >>> pde = Heat(nu=0.1); grid = pde.grid(9, 5)
        >>> u = heat_exact(pde, torch.tensor([1.0, 0.0], dtype=torch.float64), grid)
        >>> x, t = grid.coords()
        >>> u.shape, torch.allclose(u, torch.sin(math.pi * x)[:, None] * torch.exp(-0.1 * math.pi ** 2 * t))
        (torch.Size([9, 5]), True)
    """
    x, t = grid.coords(a.dtype, a.device)
    k = torch.arange(1, a.shape[-1] + 1, dtype=a.dtype, device=a.device)
    sines = torch.sin(math.pi * x[:, None] * k)  # (nx, K)
    decay = torch.exp(-pde.nu * (math.pi * k) ** 2 * t[:, None])  # (nt, K)
    return torch.einsum("...k,xk,tk->...xt", a, sines, decay)


def _check_fine(grid: Grid, nx_fine: int) -> np.ndarray:
    if nx_fine < grid.nx or nx_fine < 8:
        raise ValueError(f"nx_fine must be >= max(grid.nx, 8), got {nx_fine} for grid.nx={grid.nx}")
    return np.linspace(grid.x_min, grid.x_max, nx_fine)


def _integrate(rhs, y0: np.ndarray, grid: Grid, n: int, rtol: float, what: str) -> np.ndarray:
    diag = np.ones(n)
    sparsity = scipy.sparse.diags([diag[:-1], diag, diag[:-1]], [-1, 0, 1])
    sol = scipy.integrate.solve_ivp(rhs, (grid.t_min, grid.t_max), y0, method="BDF",
                                    t_eval=np.linspace(grid.t_min, grid.t_max, grid.nt),
                                    rtol=rtol, atol=rtol * 1e-2, jac_sparsity=sparsity)
    if not sol.success:
        raise RuntimeError(f"{what}: the reference time integration failed: {sol.message}")
    return sol.y  # (n, nt)


def _to_coarse(x_fine: np.ndarray, u_fine: np.ndarray, grid: Grid, u0: np.ndarray) -> np.ndarray:
    """Interpolate in space onto the coarse grid; the initial column is the exact initial condition."""
    x = np.linspace(grid.x_min, grid.x_max, grid.nx)
    out = np.stack([np.interp(x, x_fine, u_fine[:, j]) for j in range(u_fine.shape[1])], axis=1)
    out[:, 0] = u0
    return out


def _method_of_lines(pde: Burgers | DiffusionSorption, a: torch.Tensor, grid: Grid, nx_fine: int, rtol: float,
                     what: str, rhs: Callable[[float], Callable[[float, np.ndarray], np.ndarray]],
                     edges: Callable[[float, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Shared driver of the reference solvers: one BDF integration per sample on a fine grid.

    ``rhs(h)`` is the semi-discrete right-hand side of the interior values, ``edges(h, y)`` the
    boundary rows ``(nt,)`` given the interior solution ``y (n_interior, nt)``; the full fine
    solution is interpolated onto the coarse grid.
    """
    squeeze = a.dim() == 1
    a2 = a.reshape(1, -1) if squeeze else a
    x_f = _check_fine(grid, nx_fine)
    h = float(x_f[1] - x_f[0])
    xt = torch.as_tensor(x_f, dtype=torch.float64)
    u0_coarse = pde.initial_condition(a2.detach().to(torch.float64).cpu(), grid.coords()[0]).numpy()
    f = rhs(h)
    outs = []
    for s in range(a2.shape[0]):
        u0 = pde.initial_condition(a2[s].detach().to(torch.float64).cpu(), xt).numpy()
        y = _integrate(f, u0[1:-1], grid, nx_fine - 2, rtol, what)
        left, right = edges(h, y)
        full = np.concatenate([left[None, :], y, right[None, :]], axis=0)
        outs.append(_to_coarse(x_f, full, grid, u0_coarse[s]))
    out = torch.as_tensor(np.stack(outs), dtype=a.dtype, device=a.device)
    return out[0] if squeeze else out


def burgers_reference(pde: Burgers, a: torch.Tensor, grid: Grid, *, nx_fine: int = 513,
                      rtol: float = 1e-8) -> torch.Tensor:
    r"""Finite-difference reference for :class:`Burgers` with ``u₀ = Σₖ aₖ sin(kπx)``.

    Method of lines on ``nx_fine`` points (spacing ``h``) with ``u = 0`` at both ends,

    .. math:: \frac{dv_i}{dt} = −\frac{v_{i+1}^2 − v_{i−1}^2}{4h} + ν\,\frac{v_{i+1} − 2v_i + v_{i−1}}{h^2},

    integrated by BDF (SciPy) to ``rtol`` and interpolated linearly onto ``grid``.

    Args:
        pde: The problem.
        a: Initial-condition coefficients ``(S, modes)`` (or ``(modes,)``).
        grid: The coarse output grid.
        nx_fine: Points of the fine spatial grid (default 513).
        rtol: Relative tolerance of the BDF integrator.

    Returns:
        ``(S, nx, nt)`` (or ``(nx, nt)``) with ``a``'s dtype.

    Raises:
        RuntimeError: The time integration failed.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Burgers
        >>> pde = Burgers(); grid = pde.grid(9, 5)
        >>> a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> ref = burgers_reference(pde, a, grid, nx_fine=65)
        >>> u0 = pde.initial_condition(a, grid.coords()[0])
        >>> ref.shape, torch.equal(ref[:, :, 0], u0), float(ref[:, [0, -1]].abs().max()) < 1e-12
        (torch.Size([1, 9, 5]), True, True)
    """
    def rhs(h: float) -> Callable[[float, np.ndarray], np.ndarray]:
        def f(_t: float, v: np.ndarray) -> np.ndarray:
            u = np.concatenate([[0.0], v, [0.0]])
            flux = 0.5 * u * u
            return -(flux[2:] - flux[:-2]) / (2 * h) + pde.nu * (u[2:] - 2 * u[1:-1] + u[:-2]) / h ** 2

        return f

    def edges(_h: float, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(y.shape[1]), np.zeros(y.shape[1])

    return _method_of_lines(pde, a, grid, nx_fine, rtol, "burgers_reference", rhs, edges)


def diffusion_sorption_reference(pde: DiffusionSorption, a: torch.Tensor, grid: Grid, *,
                                 nx_fine: int = 513, rtol: float = 1e-8) -> torch.Tensor:
    r"""Finite-difference reference for :class:`DiffusionSorption`.

    Solves ``u_t = D u_xx / R(u)`` on the interior of a fine grid with ``u(0) = 1`` and the
    Robin condition ``u_N = D (3u_N − 4u_{N−1} + u_{N−2}) / (2h)`` solved for ``u_N``:

    .. math:: \frac{dv_i}{dt} = \frac{D}{R(v_i)}\,\frac{v_{i+1} − 2v_i + v_{i−1}}{h^2},\qquad
              u_N = \frac{D\,(u_{N−2} − 4u_{N−1})}{2h − 3D},

    with ``R`` the retardation factor of :meth:`DiffusionSorption.retardation`; BDF (SciPy) to
    ``rtol``, then linear interpolation onto ``grid``.

    Args:
        pde: The problem.
        a: Initial-condition coefficients ``(S, modes)`` (or ``(modes,)``).
        grid: The coarse output grid.
        nx_fine: Points of the fine spatial grid (default 513).
        rtol: Relative tolerance of the BDF integrator.

    Returns:
        ``(S, nx, nt)`` (or ``(nx, nt)``) with ``a``'s dtype.

    Raises:
        RuntimeError: The time integration failed.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import DiffusionSorption
        >>> pde = DiffusionSorption(); grid = pde.grid(9, 5)
        >>> ref = diffusion_sorption_reference(pde, torch.zeros(2, 3, dtype=torch.float64), grid, nx_fine=65)
        >>> ref.shape, torch.equal(ref[:, 0], torch.ones(2, 5, dtype=torch.float64))  # u(0, t) = 1
        (torch.Size([2, 9, 5]), True)
    """
    c = (1 - pde.porosity) / pde.porosity * pde.rho_s * pde.k_f * pde.n_f

    def right_value(h: float, v: np.ndarray) -> np.ndarray:
        # u_N = D (3 u_N - 4 u_{N-1} + u_{N-2}) / (2h)  =>  u_N (1 - 3D/2h) = D (u_{N-2} - 4 u_{N-1}) / (2h)
        return pde.D * (v[-2] - 4 * v[-1]) / (2 * h) / (1 - 3 * pde.D / (2 * h))

    def rhs(h: float) -> Callable[[float, np.ndarray], np.ndarray]:
        def f(_t: float, v: np.ndarray) -> np.ndarray:
            u = np.concatenate([[1.0], v, [right_value(h, v)]])
            ui = u[1:-1]
            R = 1 + c * (0.5 * (ui + np.sqrt(ui * ui + pde.u_smooth ** 2))) ** (pde.n_f - 1)
            return pde.D * (u[2:] - 2 * u[1:-1] + u[:-2]) / h ** 2 / R

        return f

    def edges(h: float, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(y.shape[1]), right_value(h, y)

    return _method_of_lines(pde, a, grid, nx_fine, rtol, "diffusion_sorption_reference", rhs, edges)


def reference_solution(pde: PDE1D, a: torch.Tensor, grid: Grid, **kwargs: float | int) -> torch.Tensor:
    """The reference solution of ``pde`` for initial-condition coefficients ``a`` on ``grid``.

    Heat: exact; Burgers and diffusion–sorption: the finite-difference solvers above (``kwargs``
    are passed to them). In each case ``u_ref ≈ u`` with ``𝓕(u) = 0`` inside, the boundary
    conditions on both ends and ``u(x, 0) = u₀(x; a)``.

    Raises:
        TypeError: No reference solver for this problem type.

    Example:
        >>> import torch
        >>> from optlayers.solvers.pde import Heat, PDE1D
        >>> a = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
        >>> grid = Heat().grid(8, 6)
        >>> torch.equal(reference_solution(Heat(), a, grid), heat_exact(Heat(), a, grid))
        True
        >>> reference_solution(PDE1D(), a, grid)
        Traceback (most recent call last):
            ...
        TypeError: no reference solver for PDE1D; valid: Heat, Burgers, DiffusionSorption
    """
    if isinstance(pde, Heat):
        return heat_exact(pde, a, grid)
    if isinstance(pde, Burgers):
        return burgers_reference(pde, a, grid, **kwargs)  # type: ignore[arg-type]
    if isinstance(pde, DiffusionSorption):
        return diffusion_sorption_reference(pde, a, grid, **kwargs)  # type: ignore[arg-type]
    raise TypeError(f"no reference solver for {type(pde).__name__}; valid: Heat, Burgers, DiffusionSorption")


def relative_l2_error(u: torch.Tensor, u_ref: torch.Tensor) -> torch.Tensor:
    """``‖u − u_ref‖₂ / ‖u_ref‖₂`` per sample over the last two (grid) dimensions.

    Raises:
        ValueError: ``u`` and ``u_ref`` differ in shape.

    Example:
        >>> import torch
        >>> relative_l2_error(torch.full((2, 4, 4), 1.1), torch.ones(2, 4, 4))
        tensor([0.1000, 0.1000])
    """
    if u.shape != u_ref.shape:
        raise ValueError(f"shapes differ: {tuple(u.shape)} vs {tuple(u_ref.shape)}")
    num = torch.linalg.vector_norm(u - u_ref, dim=(-2, -1))
    return num / torch.linalg.vector_norm(u_ref, dim=(-2, -1))

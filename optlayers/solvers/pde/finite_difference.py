r"""Finite-difference derivatives on a uniform 1-D space–time grid.

Fields live on a grid of ``nx`` points in space (``x_min..x_max``) by ``nt`` points in time
(``t_min..t_max``). Every operator here is second-order accurate at *every* grid point: central
differences inside, one-sided stencils at the two ends,

.. math::
    f'_0 &\approx \frac{-3f_0 + 4f_1 - f_2}{2h}, \qquad
    f'_i \approx \frac{f_{i+1} - f_{i-1}}{2h}, \qquad
    f'_{n-1} \approx \frac{3f_{n-1} - 4f_{n-2} + f_{n-3}}{2h},\\
    f''_0 &\approx \frac{2f_0 - 5f_1 + 4f_2 - f_3}{h^2}, \qquad
    f''_i \approx \frac{f_{i+1} - 2f_i + f_{i-1}}{h^2},

so a derivative is defined where boundary and initial conditions are imposed. The operators are
linear, so applied to ``N`` basis functions ``b_n`` they give the derivatives of any
combination ``u = Σ wₙ bₙ`` (the physics-informed hard-constraint layers rely on this: ``u``,
``u_t``, ``u_x`` and ``u_xx`` are linear in the coefficients ``w``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

__all__ = ["Grid", "diff1", "diff2", "space_time_derivatives", "basis_derivatives", "point_derivatives", "stencils"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A uniform space–time grid ``x_i = x_min + i·dx`` (``i < nx``), ``t_j = t_min + j·dt`` (``j < nt``).

    The steps are ``dx = (x_max − x_min)/(nx − 1)`` and ``dt = (t_max − t_min)/(nt − 1)``; the point
    ``(x_i, t_j)`` has the flat index ``i·nt + j``. Fields on the grid are batch-first with space
    before time: ``(*batch, nx, nt)``; a basis of ``N`` functions is ``(*batch, nx, nt, N)``.

    Attributes:
        nx: Number of points in space (at least 4).
        nt: Number of points in time (at least 4).
        x_min, x_max: Spatial interval (default ``[0, 1]``).
        t_min, t_max: Time interval (default ``[0, 1]``).

    Example:
        >>> g = Grid(5, 4, t_max=2.0)
        >>> g.dx, g.dt
        (0.25, 0.6666666666666666)
    """

    nx: int
    nt: int
    x_min: float = dataclasses.field(default=0.0, kw_only=True)
    x_max: float = dataclasses.field(default=1.0, kw_only=True)
    t_min: float = dataclasses.field(default=0.0, kw_only=True)
    t_max: float = dataclasses.field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        for name in ("nx", "nt"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 4:
                raise ValueError(f"Grid: {name} must be an int >= 4 (one-sided stencils need 4 points), got {v!r}")
        if not self.x_max > self.x_min:
            raise ValueError(f"Grid: need x_max > x_min, got [{self.x_min}, {self.x_max}]")
        if not self.t_max > self.t_min:
            raise ValueError(f"Grid: need t_max > t_min, got [{self.t_min}, {self.t_max}]")

    @property
    def dx(self) -> float:
        """Spatial step."""
        return (self.x_max - self.x_min) / (self.nx - 1)

    @property
    def dt(self) -> float:
        """Time step."""
        return (self.t_max - self.t_min) / (self.nt - 1)

    @property
    def size(self) -> int:
        """Number of grid points ``nx·nt``."""
        return self.nx * self.nt

    def coords(self, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1-D coordinates ``x`` (nx,) and ``t`` (nt,)."""
        x = torch.linspace(self.x_min, self.x_max, self.nx, dtype=dtype, device=device)
        t = torch.linspace(self.t_min, self.t_max, self.nt, dtype=dtype, device=device)
        return x, t

    def mesh(self, dtype: torch.dtype = torch.float64,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates on the grid, each ``(nx, nt)`` (``indexing="ij"``)."""
        x, t = self.coords(dtype, device)
        X, T = torch.meshgrid(x, t, indexing="ij")
        return X, T


def _check(f: torch.Tensor, dim: int, need: int, what: str) -> int:
    if not isinstance(f, torch.Tensor) or not f.is_floating_point():
        raise ValueError(f"{what}: f must be a floating tensor")
    dim = dim % f.dim()
    if f.shape[dim] < need:
        raise ValueError(f"{what}: need at least {need} points along dim {dim}, got {f.shape[dim]}")
    return dim


def diff1(f: torch.Tensor, h: float, dim: int = -1) -> torch.Tensor:
    r"""First derivative along ``dim`` (second order everywhere; see the module docstring).

    .. math::
        f'_i ≈ \frac{f_{i+1} − f_{i−1}}{2h}\ (0 < i < n − 1),\qquad
        f'_0 ≈ \frac{−3f_0 + 4f_1 − f_2}{2h},\qquad f'_{n−1} ≈ \frac{3f_{n−1} − 4f_{n−2} + f_{n−3}}{2h},

    with error ``O(h²)`` at every point (exact for polynomials of degree ≤ 2).

    Args:
        f: Samples on a uniform grid along ``dim`` (at least 3 points).
        h: Grid spacing.
        dim: Dimension to differentiate.

    Returns:
        A tensor shaped like ``f``.

    Example:
        >>> x = torch.linspace(0, 1, 11, dtype=torch.float64)
        >>> torch.allclose(diff1(x ** 2, 0.1), 2 * x)
        True
    """
    dim = _check(f, dim, 3, "diff1")
    g = f.movedim(dim, -1)
    first = (-3 * g[..., :1] + 4 * g[..., 1:2] - g[..., 2:3]) / (2 * h)
    inner = (g[..., 2:] - g[..., :-2]) / (2 * h)
    last = (3 * g[..., -1:] - 4 * g[..., -2:-1] + g[..., -3:-2]) / (2 * h)
    return torch.cat([first, inner, last], dim=-1).movedim(-1, dim)


def diff2(f: torch.Tensor, h: float, dim: int = -1) -> torch.Tensor:
    r"""Second derivative along ``dim`` (second order everywhere; see the module docstring).

    .. math::
        f''_i ≈ \frac{f_{i+1} − 2f_i + f_{i−1}}{h^2}\ (0 < i < n − 1),\qquad
        f''_0 ≈ \frac{2f_0 − 5f_1 + 4f_2 − f_3}{h^2}

    (mirrored at ``i = n − 1``), with error ``O(h²)`` at every point (exact for cubics).

    Args:
        f: Samples on a uniform grid along ``dim`` (at least 4 points).
        h: Grid spacing.
        dim: Dimension to differentiate.

    Returns:
        A tensor shaped like ``f``.

    Example:
        >>> x = torch.linspace(0, 1, 11, dtype=torch.float64)
        >>> torch.allclose(diff2(x ** 3, 0.1), 6 * x)
        True
    """
    dim = _check(f, dim, 4, "diff2")
    g = f.movedim(dim, -1)
    first = (2 * g[..., :1] - 5 * g[..., 1:2] + 4 * g[..., 2:3] - g[..., 3:4]) / h ** 2
    inner = (g[..., 2:] - 2 * g[..., 1:-1] + g[..., :-2]) / h ** 2
    last = (2 * g[..., -1:] - 5 * g[..., -2:-1] + 4 * g[..., -3:-2] - g[..., -4:-3]) / h ** 2
    return torch.cat([first, inner, last], dim=-1).movedim(-1, dim)


def space_time_derivatives(u: torch.Tensor, grid: Grid, *, x_dim: int = -2,
                           t_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, u_t, u_x, u_xx)`` of a field sampled on ``grid``.

    That is ``(u, D_t u, D_x u, D_xx u)`` with ``D_t = diff1(·, dt)`` along time, ``D_x = diff1(·, dx)``
    and ``D_xx = diff2(·, dx)`` along space: second-order accurate at every grid point, exact for
    fields quadratic in ``x`` and in ``t``.

    Args:
        u: Field with its space axis at ``x_dim`` (``nx`` long) and time axis at ``t_dim`` (``nt``).
        grid: The grid.
        x_dim, t_dim: Axes of space and time (default: the last two, ``(*batch, nx, nt)``).

    Returns:
        Four tensors shaped like ``u``.

    Raises:
        ValueError: ``u`` does not have ``nx`` points along ``x_dim`` and ``nt`` along ``t_dim``.

    Example:
        >>> import torch
        >>> g = Grid(5, 4, t_max=3.0)
        >>> X, T = g.mesh()
        >>> u, u_t, u_x, u_xx = space_time_derivatives(X ** 2 * T, g)
        >>> torch.allclose(u_t, X ** 2), torch.allclose(u_x, 2 * X * T), torch.allclose(u_xx, 2 * T)
        (True, True, True)
    """
    if u.shape[x_dim] != grid.nx or u.shape[t_dim] != grid.nt:
        raise ValueError(f"field has {u.shape[x_dim]} x {u.shape[t_dim]} points along (x_dim, t_dim), "
                         f"the grid {grid.nx} x {grid.nt}")
    return u, diff1(u, grid.dt, t_dim), diff1(u, grid.dx, x_dim), diff2(u, grid.dx, x_dim)


def basis_derivatives(basis: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Stack ``[b, b_t, b_x, b_xx]`` of ``N`` basis functions on ``grid``.

    The operators are linear, so for ``u = Σₙ wₙ bₙ`` the result ``D`` gives every derivative of
    ``u`` at once: ``(u, u_t, u_x, u_xx) = D · w`` (contracting the last axis).

    Args:
        basis: ``(*batch, nx, nt, N)``.
        grid: The grid.

    Returns:
        ``(*batch, nx, nt, 4, N)``; index 0..3 of the new axis are ``b, b_t, b_x, b_xx``.

    Example:
        >>> g = Grid(8, 5)
        >>> b = torch.randn(2, 8, 5, 3, dtype=torch.float64)
        >>> D = basis_derivatives(b, g)
        >>> D.shape
        torch.Size([2, 8, 5, 4, 3])
        >>> w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        >>> u_x = space_time_derivatives(b @ w, g)[2]
        >>> torch.allclose(D[..., 2, :] @ w, u_x)
        True
    """
    if basis.dim() < 3:
        raise ValueError(f"basis must be (*batch, nx, nt, N), got shape {tuple(basis.shape)}")
    return torch.stack(space_time_derivatives(basis, grid, x_dim=-3, t_dim=-2), dim=-2)


def _axis_stencil(i: torch.Tensor, n: int, h: float, order: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets and weights (``(*i, 4)``) of the first/second derivative along an axis of ``n`` points."""
    lo, hi = i == 0, i == n - 1
    if order == 1:
        inner_o, inner_w = [-1, 0, 1, 0], [-0.5, 0.0, 0.5, 0.0]
        lo_o, lo_w = [0, 1, 2, 0], [-1.5, 2.0, -0.5, 0.0]
        hi_o, hi_w = [0, -1, -2, 0], [1.5, -2.0, 0.5, 0.0]
        scale = 1 / h
    else:
        inner_o, inner_w = [-1, 0, 1, 0], [1.0, -2.0, 1.0, 0.0]
        lo_o, lo_w = [0, 1, 2, 3], [2.0, -5.0, 4.0, -1.0]
        hi_o, hi_w = [0, -1, -2, -3], [2.0, -5.0, 4.0, -1.0]
        scale = 1 / h ** 2

    def pick(a: Sequence[float], b: Sequence[float], c: Sequence[float], dt: torch.dtype) -> torch.Tensor:
        A, B, C = (torch.tensor(v, dtype=dt, device=i.device) for v in (a, b, c))
        return torch.where(lo[..., None], B, torch.where(hi[..., None], C, A))

    return pick(inner_o, lo_o, hi_o, torch.int64), pick(inner_w, lo_w, hi_w, dtype) * scale


def stencils(idx: torch.Tensor, grid: Grid, dtype: torch.dtype = torch.float64
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and weights of ``(u, u_t, u_x, u_xx)`` at the grid points ``idx`` (``i·nt + j``).

    The stencils are those of :func:`diff1`/:func:`diff2` (second order, one-sided at the ends):
    quantity ``q`` of ``(u, u_t, u_x, u_xx)`` at point ``p`` is
    ``Σ_{s<4} weight[p, q, s] · u_flat[index[p, q, s]]``, where ``u_flat = u.reshape(-1)`` is the
    field ``(nx, nt)`` flattened row-major.

    Args:
        idx: Flat point indices ``i·nt + j``, any shape.
        grid: The grid.
        dtype: dtype of the weights.

    Returns:
        ``(index, weight)``, each ``(*idx.shape, 4, 4)``: quantity × stencil entry (unused entries
        have weight 0).

    Example:
        ``u = x² + t`` at the point ``i = 0`` (the left edge: one-sided in ``x``), ``j = 2``:

        >>> import torch
        >>> g = Grid(5, 4)
        >>> X, T = g.mesh()
        >>> index, weight = stencils(torch.tensor([0 * g.nt + 2]), g)
        >>> index.shape
        torch.Size([1, 4, 4])
        >>> values = ((X ** 2 + T).reshape(-1)[index] * weight).sum(-1)
        >>> [round(v, 6) for v in values[0].tolist()]  # u, u_t, u_x, u_xx at (0, 2/3)
        [0.666667, 1.0, 0.0, 2.0]
    """
    i, j = torch.div(idx, grid.nt, rounding_mode="floor"), idx % grid.nt
    zero_o = torch.zeros(*idx.shape, 4, dtype=torch.int64, device=idx.device)
    val_w = torch.zeros(*idx.shape, 4, dtype=dtype, device=idx.device)
    val_w[..., 0] = 1
    t_o, t_w = _axis_stencil(j, grid.nt, grid.dt, 1, dtype)
    x_o, x_w = _axis_stencil(i, grid.nx, grid.dx, 1, dtype)
    xx_o, xx_w = _axis_stencil(i, grid.nx, grid.dx, 2, dtype)
    offsets = torch.stack([zero_o, t_o, x_o * grid.nt, xx_o * grid.nt], -2)  # flat offsets
    return idx[..., None, None] + offsets, torch.stack([val_w, t_w, x_w, xx_w], -2)


def point_derivatives(basis: torch.Tensor, grid: Grid, idx: torch.Tensor) -> torch.Tensor:
    """``[b, b_t, b_x, b_xx]`` of ``N`` basis functions at the grid points ``idx`` only.

    For each point ``p`` and quantity ``q``,
    ``out[:, p, q] = Σ_s weight[p, q, s] · b[:, index[p, q, s]]`` with the :func:`stencils` of ``p``.
    Equal to ``basis_derivatives(basis, grid)`` gathered at ``idx`` but computed from the stencils
    of those points, so memory and backward cost scale with the number of points, not the grid.

    Args:
        basis: ``(S, nx, nt, N)``.
        grid: The grid.
        idx: Flat point indices ``i·nt + j`` of any shape.

    Returns:
        ``(S, *idx.shape, 4, N)``.

    Example:
        >>> g = Grid(6, 5)
        >>> b = torch.randn(2, 6, 5, 3, dtype=torch.float64)
        >>> idx = torch.tensor([0, 7, 29])
        >>> ref = basis_derivatives(b, g).reshape(2, 30, 4, 3)[:, idx]
        >>> torch.allclose(point_derivatives(b, g, idx), ref)
        True
    """
    if basis.dim() != 4 or tuple(basis.shape[1:3]) != (grid.nx, grid.nt):
        raise ValueError(f"basis must be (S, {grid.nx}, {grid.nt}, N), got {tuple(basis.shape)}")
    index, weight = stencils(idx, grid, basis.dtype)
    S, N = basis.shape[0], basis.shape[-1]
    flat = basis.reshape(S, grid.size, N)
    out = []
    for q, width in enumerate((1, 3, 3, 4)):  # entries actually used by u, u_t, u_x, u_xx
        ix, w = index[..., q, :width], weight[..., q, :width]
        vals = flat.index_select(1, ix.reshape(-1)).reshape(S, *ix.shape, N)
        out.append(vals[..., 0, :] if width == 1 else (vals * w[..., None]).sum(-2))
    return torch.stack(out, -2)

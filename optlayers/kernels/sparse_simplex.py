r"""Batched projection onto the ``k``-sparse simplex: the hot loop of sparse optimal transport.

Kernel ``"sparse_simplex_projection"``: for every row ``x_r`` of ``x (R, n)``, with ``k`` and
masses ``s (R,)``,

.. math::

    p_r = \operatorname*{arg\,min}_{p \ge 0,\ \sum_i p_i = s_r,\ \lVert p \rVert_0 \le k}
          \lVert p - x_r \rVert_2^2 ,

computed exactly by *top-k selection + threshold* (Kyrillidis et al. 2013): keep the
``kk = min(k, n)`` largest entries, then ``p_i = max(x_i − τ, 0)`` on them with the simplex
threshold ``τ`` of those entries (Held et al. 1974; Michelot 1986).

Signature shared by every backend (the reference below is the specification)::

    fn(x: Tensor (R, n) floating, k: int >= 1, s: Tensor (R,) >= 0, offset: Tensor (G, n) | None = None)
        -> (values (R, kk) x.dtype, indices (R, kk) int64)

With ``offset`` (``G`` dividing ``R``) the rows projected are ``offset[r // (R/G)] − x[r]``
instead of ``x[r]``, computed on the fly: this is the semi-dual of optimal transport, whose rows
are ``(α − C_{:,j})/γ`` (``offset = α/γ``, ``x = Cᵀ/γ``), without materializing them.

* ``indices`` of a row are distinct and contain the row's ``kk`` largest entries (ties broken
  arbitrarily); ``values`` are ``max(x_i − τ, 0)`` there (zero outside the simplex support),
  so ``zeros(R, n).scatter(1, indices, values)`` is the projection and each row has at most
  ``kk`` nonzeros summing to ``s_r``.
* The *order* of the ``kk`` slots is unspecified (the reference sorts them by decreasing
  ``x``, the Triton kernel keeps index order): compare backends densely.
* Half precision is computed in float32; outputs have the dtype of ``x``. No gradients: the
  callers (:mod:`optlayers.solvers.sparse_ot`) recompute the values differentiably on the
  returned support.

Backends: the PyTorch reference (any device), Numba (CPU; a bounded min-heap selection for small
``kk`` and a full sort otherwise, rows in parallel), Triton (CUDA; one program per row, exact
radix selection of the ``kk``-th largest entry by bisection over its bit pattern, then Michelot's
finite threshold iteration — no sort). Importing this module registers the three loaders and
imports neither Numba nor Triton.

References:
    Kyrillidis, Becker, Cevher, Koch (2013). Sparse projections onto the simplex. ICML.
    Michelot (1986). A finite algorithm for finding the projection of a point onto the
    canonical simplex of R^n. JOTA.
    Condat (2016). Fast projection onto the simplex and the l1 ball. Math. Programming.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._dispatch import Backend, register

__all__ = ["KERNEL_NAME", "sparse_simplex_reference", "sparse_simplex_to_dense", "check_kernel_args"]

#: Name under which the three implementations are registered with the dispatch.
KERNEL_NAME = "sparse_simplex_projection"


def check_kernel_args(x: torch.Tensor, k: int, s: torch.Tensor, offset: torch.Tensor | None = None) -> int:
    """Validate the kernel arguments; returns ``kk = min(k, n)``.

    Raises:
        ValueError: ``x`` not a floating ``(R, n)`` tensor with ``n >= 1``, ``k`` not an int
            ``>= 1``, ``s`` not of shape ``(R,)``, or ``offset`` not ``(G, n)`` with ``G``
            dividing ``R``.

    Example:
        >>> import torch
        >>> from optlayers.kernels.sparse_simplex import check_kernel_args
        >>> check_kernel_args(torch.zeros(3, 5), 8, torch.ones(3))     # k clipped to n
        5
    """
    if offset is not None:
        if (not isinstance(offset, torch.Tensor) or offset.dim() != 2 or not isinstance(x, torch.Tensor)
                or x.dim() != 2 or offset.shape[1] != x.shape[1] or offset.shape[0] < 1
                or x.shape[0] % offset.shape[0] != 0):
            raise ValueError("offset must be a tensor of shape (G, n) with G dividing the number of rows of x")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() or x.shape[1] < 1:
        raise ValueError(f"x must be a floating tensor of shape (R, n) with n >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != (x.shape[0],):
        raise ValueError(f"s must be a tensor of shape ({x.shape[0]},), got "
                         f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
    return min(k, x.shape[1])


def sparse_simplex_reference(x: torch.Tensor, k: int, s: torch.Tensor,
                             offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the ``k``-sparse simplex projection (the specification).

    ``torch.topk`` (sorted) selects the ``kk`` largest entries; the threshold is
    ``τ = (Σ_{j≤ρ} u_j − s)/ρ`` with ``ρ`` the number of sorted entries ``u_j`` satisfying
    ``j u_j > Σ_{i≤j} u_i − s`` (a prefix). Works on any device and under ``torch.func``.

    Args:
        x: ``(R, n)`` floating tensor.
        k: Maximum number of nonzeros per row (``>= 1``; clipped to ``n``).
        s: ``(R,)`` nonnegative masses.
        offset: ``(G, n)`` or None; if given, the rows ``offset[r // (R/G)] − x[r]`` are projected.

    Returns:
        ``(values, indices)``, each ``(R, min(k, n))``; slots sorted by decreasing entry.

    Example:
        The two largest entries of ``x`` are 2 and 1; only the first survives the threshold
        ``τ = 1``:

        >>> import torch
        >>> from optlayers.kernels.sparse_simplex import sparse_simplex_reference
        >>> x = torch.tensor([[0.5, 2.0, 1.0, -1.0]], dtype=torch.float64)
        >>> values, indices = sparse_simplex_reference(x, 2, torch.tensor([1.0], dtype=torch.float64))
        >>> values.tolist(), indices.tolist()
        ([[1.0, 0.0]], [[1, 2]])
    """
    kk = check_kernel_args(x, k, s, offset)
    if x.dtype in (torch.float16, torch.bfloat16):
        v, i = sparse_simplex_reference(x.float(), k, s.float(), None if offset is None else offset.float())
        return v.to(x.dtype), i
    if offset is not None:
        G = offset.shape[0]
        x = (offset.to(x.dtype).unsqueeze(1) - x.reshape(G, -1, x.shape[1])).reshape(x.shape)
    s = s.to(x.dtype)
    u, idx = torch.topk(x, kk, dim=-1, largest=True, sorted=True)
    css = torch.cumsum(u, dim=-1) - s[:, None]
    j = torch.arange(1, kk + 1, dtype=x.dtype, device=x.device)
    rho = (u * j > css).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = torch.gather(css, -1, rho - 1) / rho.to(x.dtype)
    return torch.clamp(u - tau, min=0), idx


def sparse_simplex_to_dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter the compact kernel output ``(R, kk)`` into a dense ``(R, n)`` tensor.

    ``out[r, indices[r, t]] = values[r, t]``, zero elsewhere.

    Example:
        >>> import torch
        >>> from optlayers.kernels.sparse_simplex import sparse_simplex_to_dense
        >>> values = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
        >>> sparse_simplex_to_dense(values, torch.tensor([[2, 0]]), 4).tolist()
        [[0.3, 0.0, 0.7, 0.0]]
    """
    out = torch.zeros(*values.shape[:-1], n, dtype=values.dtype, device=values.device)
    return out.scatter(-1, indices, values)


def _load_numba() -> Callable[..., Any]:
    from .sparse_simplex_numba import sparse_simplex_numba

    return sparse_simplex_numba


def _load_triton() -> Callable[..., Any]:
    from .sparse_simplex_triton import sparse_simplex_triton

    return sparse_simplex_triton


register(KERNEL_NAME, Backend.REFERENCE, lambda: sparse_simplex_reference)
# min_size = R * n. Numba wins over torch.topk + sort from a few thousand entries (see
# benchmarks/bench_sparse_ot.py); below that the reference's lower call overhead wins.
register(KERNEL_NAME, Backend.NUMBA, _load_numba, min_size=4096)
register(KERNEL_NAME, Backend.TRITON, _load_triton)

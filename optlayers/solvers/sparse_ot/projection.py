r"""Differentiable (k-sparse) simplex projections on top of the ``sparse_simplex_projection`` kernel.

.. math::

    \Pi_{k, s}(x) = \operatorname*{arg\,min}_{p \ge 0,\ \sum_i p_i = s,\ \lVert p \rVert_0 \le k}
                    \lVert p - x \rVert_2^2 ,
    \qquad p_i = \max(x_i - \tau, 0)\ \text{on the top-}k\ \text{entries},\ 0\ \text{elsewhere}.

``k = n`` (or ``None``) is the Euclidean projection onto the simplex, i.e. *sparsemax*
(Martins & Astudillo 2016); ``k = 1`` puts all the mass on the arg-max. The hot loop (selection
and threshold) runs in the dispatched kernel without a graph; the values on the returned support
``S`` are then recomputed with PyTorch operations,

.. math:: p_S = x_S - \frac{\mathbf 1^\top x_S - s}{|S|}\mathbf 1 ,

so autograd gives the exact Jacobian ``I − 11ᵀ/|S|`` on ``S`` (zero elsewhere; valid almost
everywhere, i.e. away from ties) and ``∂p_S/∂s = 1/|S|``. Under ``torch.func`` transforms the
PyTorch reference is used throughout (no kernel can run on transformed tensors).

References:
    Martins & Astudillo (2016). From softmax to sparsemax. ICML.
    Kyrillidis, Becker, Cevher, Koch (2013). Sparse projections onto the simplex. ICML.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ...kernels import Backend, dispatch
from ...kernels.sparse_simplex import KERNEL_NAME

__all__ = ["sparse_simplex_projection", "sparsemax", "project_topk_simplex", "support_values"]


def _transforms_active() -> bool:
    return bool(torch._C._are_functorch_transforms_active())


def project_topk_simplex(x: Tensor, k: int, s: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch (differentiable, vmappable) k-sparse simplex projection along the last dim.

    Args:
        x: ``(..., n)``.
        k: ``>= 1`` (clipped to ``n``).
        s: ``(...)`` masses, broadcastable to ``x.shape[:-1]``.

    Returns:
        ``(values, indices)`` of shape ``(..., min(k, n))``, slots sorted by decreasing ``x``.
    """
    kk = min(int(k), x.shape[-1])
    u, idx = torch.topk(x, kk, dim=-1, largest=True, sorted=True)
    css = torch.cumsum(u, dim=-1) - s.unsqueeze(-1)
    j = torch.arange(1, kk + 1, dtype=x.dtype, device=x.device)
    rho = (u * j > css).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = torch.gather(css, -1, rho - 1) / rho.to(x.dtype)
    return torch.clamp(u - tau, min=0), idx


def support_values(xs: Tensor, support: Tensor, s: Tensor) -> Tensor:
    """Projection values on a known support: ``x_S − (Σ_S x − s)/|S|`` on ``S``, 0 elsewhere.

    Args:
        xs: ``(..., w)`` entries of ``x`` at the returned indices.
        support: ``(..., w)`` bool, where the projection is positive.
        s: ``(...)`` masses.
    """
    cnt = support.sum(-1, keepdim=True).clamp(min=1).to(xs.dtype)
    tau = (torch.where(support, xs, torch.zeros_like(xs)).sum(-1, keepdim=True) - s.unsqueeze(-1)) / cnt
    return torch.where(support, xs - tau, torch.zeros_like(xs))


def _check_k(k: int | None, n: int) -> int:
    if k is None:
        return n
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < 1:
        raise ValueError(f"k must be an int >= 1 or None, got {k!r}")
    return min(int(k), n)


def sparse_simplex_projection(x: Tensor, k: int | None, s: float | Tensor = 1.0, *, dim: int = -1,
                              backend: Backend | str | None = None) -> tuple[Tensor, Tensor]:
    r"""Batched projection onto the ``k``-sparse simplex, in compact form.

    Computes :math:`\Pi_{k,s}(x)` (see the module docstring) for every slice of ``x`` along
    ``dim`` with the dispatched kernel (Numba on CPU, Triton on CUDA, else the PyTorch
    reference; ``backend=`` forces one), then recomputes the values on the support with PyTorch
    operations so gradients flow to ``x`` and ``s``.

    Args:
        x: Floating tensor; projected along ``dim``.
        k: Maximum number of nonzeros per slice, an int ``>= 1`` (clipped to the slice length) or
            None (no cardinality constraint: the simplex projection).
        s: Mass :math:`s \ge 0`, a number or a tensor broadcastable to the batch shape
            (``x.shape`` without ``dim``). Differentiable.
        dim: Dimension to project along.
        backend: Force a kernel backend (``"reference"``, ``"numba"``, ``"triton"``).

    Returns:
        ``(values, indices)``, each of shape ``x.shape`` with ``dim`` replaced by
        ``min(k, n)`` and moved last: ``values`` (differentiable) are the projection at
        ``indices`` (distinct; they hold the ``min(k, n)`` largest entries); the other entries
        of the projection are zero.

    Raises:
        ValueError: ``x`` not floating, ``k`` not a positive int, negative ``s``.
        KernelUnavailableError: a forced backend cannot run.

    Example:
        >>> import torch
        >>> v, i = sparse_simplex_projection(torch.tensor([[0.5, 1.0, 0.9]]), k=2)
        >>> torch.zeros(1, 3).scatter(-1, i, v)
        tensor([[0.0000, 0.5500, 0.4500]])
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise ValueError("x must be a floating tensor with at least one dimension")
    xt = x.movedim(dim, -1)
    n = xt.shape[-1]
    kk = _check_k(k, n)
    batch = xt.shape[:-1]
    s_t = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    s_t = torch.broadcast_to(s_t, batch)
    if not _transforms_active() and bool((s_t < 0).any()):
        raise ValueError("s must be >= 0")
    if _transforms_active():
        return project_topk_simplex(xt, kk, s_t)
    flat = xt.reshape(-1, n)
    fn = dispatch(KERNEL_NAME, backend=backend, device=x.device, size=flat.numel())
    with torch.no_grad():
        vals, idx = fn(flat.detach(), kk, s_t.detach().reshape(-1))
    idx = idx.reshape(*batch, kk)
    if not (x.requires_grad or s_t.requires_grad):
        return vals.reshape(*batch, kk), idx
    support = (vals > 0).reshape(*batch, kk)
    return support_values(torch.gather(xt, -1, idx), support, s_t), idx


def sparsemax(x: Tensor, *, k: int | None = None, dim: int = -1,
              backend: Backend | str | None = None) -> Tensor:
    r"""Sparsemax (Euclidean projection onto the probability simplex), optionally ``k``-sparse.

    .. math:: \operatorname{sparsemax}_k(x) = \operatorname*{arg\,min}_{p \in \Delta,\ \lVert p
              \rVert_0 \le k} \lVert p - x \rVert_2^2 .

    ``k=None`` is sparsemax (Martins & Astudillo 2016); ``k=1`` is the one-hot arg-max. The
    output is dense; gradients are exact almost everywhere (see the module docstring).

    Args:
        x: Floating tensor of scores.
        k: Maximum number of nonzeros (None: no limit).
        dim: Dimension along which the output sums to one.
        backend: Force a kernel backend.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch
        >>> sparsemax(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])
    """
    vals, idx = sparse_simplex_projection(x, k, 1.0, dim=dim, backend=backend)
    xt = x.movedim(dim, -1)
    out = torch.zeros_like(xt).scatter(-1, idx, vals)
    return out.movedim(-1, dim)

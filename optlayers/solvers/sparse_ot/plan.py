"""A batch of sparse transport plans, stored compressed along the constrained axis.

:class:`SparseTransportPlan` mirrors the interface of :class:`optlayers.solvers.ot.TransportPlan`
(``matvec``, ``rmatvec``, ``.T``, ``marginals``, ``to_dense``, ``topk``, ``transport_cost``) and
adds the raw storage: for ``axis="column"`` each column ``j`` of ``P (*batch, n, m)`` keeps the
row indices ``indices[..., j, :]`` and values ``values[..., j, :]`` of its (at most ``w``)
nonzeros; for ``axis="row"`` each row keeps column indices. Padding slots hold a value of zero
(and some distinct index). Every operation is differentiable in ``values`` (and the cost).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["SparseTransportPlan"]

_AXES = ("column", "row")


class SparseTransportPlan:
    r"""Sparse transport plans ``P (*batch, n, m)`` with at most ``w`` nonzeros per column (or row).

    For ``axis="column"`` the stored entries are

    .. math::

        P_{I_{jl},\, j} = V_{jl}, \qquad l = 1, \dots, w,

    (``I = indices``, ``V = values``), every other entry of column ``j`` being zero; for
    ``axis="row"``, :math:`P_{i,\, I_{il}} = V_{il}`. Products, marginals and costs cost
    :math:`O(Lw)`: :math:`(Pv)_i = \sum_{j, l:\, I_{jl} = i} V_{jl} v_j`,
    :math:`(P^\top u)_j = \sum_l V_{jl} u_{I_{jl}}`, :math:`\langle C, P\rangle = \sum_{j,l}
    V_{jl} C_{I_{jl}, j}`.

    Attributes:
        indices: ``(*batch, L, w)`` int64; ``L = m`` (row indices of each column) for
            ``axis="column"``, ``L = n`` (column indices of each row) for ``axis="row"``.
        values: ``(*batch, L, w)`` the entries there (zero in padding slots).
        axis: ``"column"`` or ``"row"``, the compressed (sparsity-constrained) axis.
        cost: The cost ``C (*batch, n, m)`` the plan was computed for, or None.

    Example:
        A ``3 × 2`` plan stored by column (the last slot of column 1 is padding):

        >>> import torch
        >>> idx = torch.tensor([[0, 2], [1, 0]])
        >>> val = torch.tensor([[0.25, 0.25], [0.5, 0.0]], dtype=torch.float64)
        >>> P = SparseTransportPlan(idx, val, 3, 2, "column")
        >>> P.to_dense()
        tensor([[0.2500, 0.0000],
                [0.0000, 0.5000],
                [0.2500, 0.0000]], dtype=torch.float64)
        >>> P.nnz(), P.marginals()[0]
        (tensor([2, 1]), tensor([0.2500, 0.5000, 0.2500], dtype=torch.float64))
        >>> v = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> torch.allclose(P.matvec(v), P.to_dense() @ v), torch.equal(P.T.to_dense(), P.to_dense().T)
        (True, True)

        The plans :func:`sparse_ot` returns:

        >>> from optlayers.solvers.sparse_ot import sparse_ot
        >>> C = torch.rand(6, 5, dtype=torch.float64)
        >>> P = sparse_ot(None, None, C, k=2, gamma=0.1).aux.plan
        >>> bool((P.nnz() <= 2).all()), tuple(P.to_dense().shape)
        (True, (6, 5))
        >>> torch.allclose(P.transport_cost(), (C * P.to_dense()).sum())
        True
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, n: int, m: int, axis: str = "column",
                 cost: torch.Tensor | None = None) -> None:
        if axis not in _AXES:
            raise ValueError(f"axis must be one of {_AXES}, got {axis!r}")
        if indices.shape != values.shape or indices.dim() < 2:
            raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must share a shape "
                             "(*batch, L, w)")
        L = m if axis == "column" else n
        if indices.shape[-2] != L:
            raise ValueError(f"axis={axis!r} needs {L} compressed lines, got {indices.shape[-2]}")
        self.indices, self.values = indices, values
        self.n, self.m, self.axis, self.cost = int(n), int(m), axis, cost

    # ------------------------------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.n, self.m)

    @property
    def width(self) -> int:
        """Slots per compressed line (``w``)."""
        return self.values.shape[-1]

    @property
    def _other(self) -> int:
        return self.n if self.axis == "column" else self.m

    def _gather(self, v: torch.Tensor) -> torch.Tensor:
        """``Σ_w values[l, w] v[indices[l, w]]`` for ``v (*batch, other[, k])`` -> ``(*batch, L[, k])``."""
        batch = self.batch_shape
        vec = v.dim() == len(batch) + 1
        vv = v.unsqueeze(-1) if vec else v
        L, w = self.values.shape[-2:]
        idx = self.indices.reshape(*batch, L * w, 1).expand(*batch, L * w, vv.shape[-1])
        g = torch.gather(vv.to(self.values.dtype), -2, idx).reshape(*batch, L, w, vv.shape[-1])
        out = (self.values.unsqueeze(-1) * g).sum(-2)
        return out.squeeze(-1) if vec else out

    def _scatter(self, u: torch.Tensor) -> torch.Tensor:
        """``out[indices[l, w]] += values[l, w] u[l]`` for ``u (*batch, L[, k])`` -> ``(*batch, other[, k])``."""
        batch = self.batch_shape
        vec = u.dim() == len(batch) + 1
        uu = u.unsqueeze(-1) if vec else u
        L, w = self.values.shape[-2:]
        k = uu.shape[-1]
        contrib = (self.values.unsqueeze(-1) * uu.to(self.values.dtype).unsqueeze(-2)).reshape(*batch, L * w, k)
        idx = self.indices.reshape(*batch, L * w, 1).expand(*batch, L * w, k)
        out = torch.zeros(*batch, self._other, k, dtype=contrib.dtype, device=contrib.device)
        out = out.scatter_add(-2, idx, contrib)
        return out.squeeze(-1) if vec else out

    def _check(self, v: torch.Tensor, size: int, name: str) -> None:
        batch = self.batch_shape
        if not isinstance(v, torch.Tensor) or v.shape[: len(batch)] != batch or v.dim() not in (
                len(batch) + 1, len(batch) + 2) or v.shape[len(batch)] != size:
            raise ValueError(f"{name}: expected a tensor of shape {(*batch, size)} or {(*batch, size, 'k')}, "
                             f"got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v (*batch, m)`` or ``(*batch, m, k)``."""
        self._check(v, self.m, "matvec")
        return self._scatter(v) if self.axis == "column" else self._gather(v)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``Pᵀ u`` for ``u (*batch, n)`` or ``(*batch, n, k)``."""
        self._check(u, self.n, "rmatvec")
        return self._gather(u) if self.axis == "column" else self._scatter(u)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    @property
    def T(self) -> SparseTransportPlan:
        """The transposed plan ``Pᵀ (*batch, m, n)`` (same storage, the other axis)."""
        cost = None if self.cost is None else self.cost.transpose(-1, -2)
        return SparseTransportPlan(self.indices, self.values, self.m, self.n,
                                   "row" if self.axis == "column" else "column", cost)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row sums ``P 1 (*batch, n)`` and column sums ``Pᵀ 1 (*batch, m)``."""
        line = self.values.sum(-1)
        ones = torch.ones(*self.batch_shape, self.values.shape[-2], dtype=self.values.dtype,
                          device=self.values.device)
        other = self._scatter(ones)
        return (other, line) if self.axis == "column" else (line, other)

    def nnz(self) -> torch.Tensor:
        """Number of nonzeros of each compressed line (column or row), ``(*batch, L)``."""
        return (self.values != 0).sum(-1)

    def to_dense(self) -> torch.Tensor:
        """The plan as a ``(*batch, n, m)`` tensor (differentiable in ``values``)."""
        batch = self.batch_shape
        L = self.values.shape[-2]
        dense = torch.zeros(*batch, L, self._other, dtype=self.values.dtype, device=self.values.device)
        dense = dense.scatter(-1, self.indices, self.values)
        return dense.transpose(-1, -2) if self.axis == "column" else dense

    @torch.no_grad()
    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest entries of each row of ``P`` (no gradient).

        Returns:
            ``(values, indices)``, each ``(*batch, n, min(k, m))``.
        """
        k = min(int(k), self.m)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return torch.topk(self.to_dense(), k, dim=-1)

    def transport_cost(self) -> torch.Tensor:
        """``⟨C, P⟩ (*batch,)`` over the nonzeros (needs ``cost``)."""
        if self.cost is None:
            raise ValueError("this plan was built without its cost matrix")
        c = self.cost.transpose(-1, -2) if self.axis == "column" else self.cost
        return (self.values * torch.gather(c, -1, self.indices)).sum((-1, -2))

    def __repr__(self) -> str:
        return f"SparseTransportPlan(shape={self.shape}, axis={self.axis!r}, width={self.width})"


def _flatten(p: SparseTransportPlan) -> tuple[list[Any], Any]:
    return [p.indices, p.values, p.cost], (p.n, p.m, p.axis)


def _unflatten(values: Any, context: Any) -> SparseTransportPlan:
    n, m, axis = context
    return SparseTransportPlan(values[0], values[1], n, m, axis, values[2])


pytree.register_pytree_node(SparseTransportPlan, _flatten, _unflatten,
                            serialized_type_name="optlayers.solvers.sparse_ot.SparseTransportPlan")

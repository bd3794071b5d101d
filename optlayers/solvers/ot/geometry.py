"""Geometries for optimal transport: a dense cost matrix, or point clouds with an online cost.

A geometry knows how to apply the two operations Sinkhorn needs, never more:

.. math::
    \\operatorname{softmin}_\\varepsilon(h)_i = -\\varepsilon \\log \\sum_j
        \\exp\\big((h_j - C_{ij})/\\varepsilon\\big)  \\quad(\\text{axis}=1,\\ h\\in\\mathbb R^m)

(and the same over ``i`` for ``axis=0``), and the kernel application
``Σ_j exp(α_i + β_j − C_ij/ε) v_j`` that the transport plan uses. Point clouds above
:data:`ONLINE_THRESHOLD` entries evaluate the cost block by block, so no ``n × m`` matrix is
stored.

All geometries are batch-first: a cost ``(*batch, n, m)`` or points ``(*batch, n, d)`` and
``(*batch, m, d)``; internally the batch is flattened to one dimension ``B``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from ...kernels import softmin as _kernels
from ...kernels.softmin_reference import (
    CallableSource,
    CostSource,
    DenseSource,
    PNormSource,
    SqEuclideanSource,
    block_rows,
    kernel_apply_reference,
    softmin_reference,
)
from ._online_softmin import online_softmin

__all__ = ["SqEuclidean", "PNorm", "CustomCost", "Cost", "Geometry", "CostMatrix", "PointCloud",
           "as_geometry", "ONLINE_THRESHOLD"]

#: Point clouds with more than this many cost entries (``B · n · m``) use the online cost by
#: default (``online=None``).
ONLINE_THRESHOLD = 1 << 22


@dataclasses.dataclass(frozen=True)
class SqEuclidean:
    """Squared Euclidean cost ``C(x, y) = scale · ‖x − y‖²``.

    Args:
        scale: Positive factor (GeomLoss's ``p=2`` convention is ``scale=0.5``).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import PointCloud, SqEuclidean
        >>> x = torch.rand(5, 3, dtype=torch.float64)
        >>> y = torch.rand(4, 3, dtype=torch.float64)
        >>> C = PointCloud(x, y, SqEuclidean(scale=0.5)).to_dense()
        >>> torch.allclose(C, 0.5 * torch.cdist(x, y) ** 2)
        True
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")


@dataclasses.dataclass(frozen=True)
class PNorm:
    """Power of the Euclidean distance, ``C(x, y) = scale · ‖x − y‖₂^p``.

    Args:
        p: Positive exponent (``p=2`` is :class:`SqEuclidean`, ``p=1`` the Euclidean distance).
        scale: Positive factor (GeomLoss's convention is ``1/p``).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import PointCloud, PNorm
        >>> x = torch.rand(5, 3, dtype=torch.float64)
        >>> y = torch.rand(4, 3, dtype=torch.float64)
        >>> C = PointCloud(x, y, PNorm(1.5)).to_dense()
        >>> torch.allclose(C, torch.cdist(x, y) ** 1.5)
        True
    """

    p: float
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.p > 0:
            raise ValueError(f"p must be positive, got {self.p}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")


@dataclasses.dataclass(frozen=True)
class CustomCost:
    """A user cost ``fn(x (B, r, d), y (B, m, d)) -> (B, r, m)``, evaluated block by block.

    The function must be batched over the leading dimension, differentiable in PyTorch ops and
    free of data-dependent control flow (``torch.func`` transforms go through it). The cost is
    ``C_ij = fn(x, y)[b, i, j]``, computed for blocks of rows ``x[:, i0:i1]`` at a time.

    Args:
        fn: The batched cost function.

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import PointCloud, CustomCost
        >>> l1 = CustomCost(lambda u, v: (u[:, :, None, :] - v[:, None, :, :]).abs().sum(-1))
        >>> x = torch.rand(5, 3, dtype=torch.float64)
        >>> y = torch.rand(4, 3, dtype=torch.float64)
        >>> torch.allclose(PointCloud(x, y, l1).to_dense(), torch.cdist(x, y, p=1))
        True
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


Cost = SqEuclidean | PNorm | CustomCost

_COST_NAMES: dict[str, Cost] = {"sqeuclidean": SqEuclidean(), "euclidean": PNorm(1.0)}


def _resolve_cost(cost: Cost | str | Callable[..., torch.Tensor]) -> Cost:
    if isinstance(cost, (SqEuclidean, PNorm, CustomCost)):
        if isinstance(cost, PNorm) and cost.p == 2.0:
            return SqEuclidean(cost.scale)
        return cost
    if isinstance(cost, str):
        if cost not in _COST_NAMES:
            raise ValueError(f"unknown cost {cost!r}; valid names: {sorted(_COST_NAMES)}")
        return _COST_NAMES[cost]
    if callable(cost):
        return CustomCost(cost)
    raise ValueError(f"cost must be SqEuclidean, PNorm, CustomCost, a name or a callable, got {cost!r}")


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when the reference (differentiable, transform-friendly) path must be used."""
    if torch._C._are_functorch_transforms_active():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


class Geometry:
    """Base class: a batch of ``B`` cost matrices ``(n, m)`` accessed only through reductions.

    A subclass supplies the cost (:meth:`source`); the base class derives the two reductions
    Sinkhorn needs,

    .. math::
        \\operatorname{softmin}_\\varepsilon(h)_i = -\\varepsilon \\log \\sum_j
            e^{(h_j - C_{ij})/\\varepsilon}, \\qquad
        (K v)_{ik} = \\sum_j e^{\\alpha_i + \\beta_j - C_{ij}/\\varepsilon} v_{jk},

    streamed over blocks of rows, so an online geometry never stores ``C``. Use
    :class:`CostMatrix` or :class:`PointCloud`.

    Attributes:
        batch_shape: The leading batch shape given by the user (``()`` when unbatched).
        n: Number of source points (rows).
        m: Number of target points (columns).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import CostMatrix, Geometry
        >>> geom = CostMatrix(torch.rand(5, 4, dtype=torch.float64))
        >>> isinstance(geom, Geometry)
        True
        >>> h, eps = torch.zeros(1, 4, dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)
        >>> expected = -0.1 * torch.logsumexp(-geom.cost / 0.1, dim=-1)
        >>> torch.allclose(geom.softmin(h, eps, axis=1), expected[None])
        True
    """

    batch_shape: tuple[int, ...]
    block_elements: int | None

    # -- to implement -----------------------------------------------------------------------
    def source(self, differentiable: bool) -> CostSource:
        """The cost source for the kernels (flattened batch ``B``)."""
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the cost depends on (differentiated through)."""
        raise NotImplementedError

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> Geometry:
        """The same geometry with its tensors replaced (same order as :meth:`tensors`)."""
        raise NotImplementedError

    def transpose(self) -> Geometry:
        """The geometry of ``Cᵀ``."""
        raise NotImplementedError

    @property
    def n(self) -> int:
        raise NotImplementedError

    @property
    def m(self) -> int:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def is_online(self) -> bool:
        """True when the cost is recomputed block by block (never stored)."""
        return False

    @property
    def matrix_free_softmin(self) -> bool:
        """True when the differentiable soft-min has a matrix-free backward (online ``SqEuclidean``)."""
        return False

    def softmin(self, h: torch.Tensor, eps: torch.Tensor, axis: int) -> torch.Tensor:
        """``−ε log Σ exp((h − C)/ε)`` reduced over ``axis`` of ``C`` (1: over ``j``; 0: over ``i``).

        Args:
            h: ``(B, m)`` for ``axis=1`` or ``(B, n)`` for ``axis=0``; ``−inf`` entries are ignored.
            eps: ``(B,)``.
            axis: 1 or 0.

        Returns:
            ``(B, n)`` for ``axis=1``, ``(B, m)`` for ``axis=0``.
        """
        geom = self if axis == 1 else self.transpose()
        if _needs_autograd(h, eps, *geom.tensors()):
            if geom.matrix_free_softmin:
                # online squared-Euclidean cloud: the backward applies the soft-min weights as
                # an operator instead of storing every block (see _online_softmin.py)
                assert isinstance(geom, PointCloud) and isinstance(geom.cost, SqEuclidean)
                return online_softmin(geom._flat(geom.x, 2), geom._flat(geom.y, 2), geom.cost.scale, h, eps,
                                      block_elements=self.block_elements)
            return softmin_reference(geom.source(True), h, eps, block_elements=self.block_elements)
        # no autograd: the kernel chosen by optlayers.kernels.dispatch ("ot.softmin")
        return _kernels.softmin(geom.source(False), h, eps, block_elements=self.block_elements)

    def kernel_apply(self, alpha: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """``Σ_j exp(α_i + β_j − C_ij/ε) v_jk`` for ``v (B, m, k)``; returns ``(B, n, k)``."""
        if _needs_autograd(alpha, beta, eps, v, *self.tensors()):
            return kernel_apply_reference(self.source(True), alpha, beta, eps, v,
                                          block_elements=self.block_elements)
        # no autograd: the kernel chosen by optlayers.kernels.dispatch ("ot.kernel_apply")
        return _kernels.kernel_apply(self.source(False), alpha, beta, eps, v,
                                     block_elements=self.block_elements)

    def to_dense(self) -> torch.Tensor:
        """The cost matrix, ``(*batch, n, m)`` (differentiable). Only for small problems."""
        src = self.source(True)
        return src.block(0, self.n).reshape(*self.batch_shape, self.n, self.m)

    @torch.no_grad()
    def reduce_cost(self, weights_a: torch.Tensor, weights_b: torch.Tensor,
                    kind: str) -> torch.Tensor:
        """Mean (weighted by the masks ``w_a ⊗ w_b``) or max of the cost, ``(B,)``, no grad.

        Args:
            weights_a: ``(B, n)`` nonnegative; weights_b: ``(B, m)``.
            kind: ``"mean"`` or ``"max"`` (over pairs with positive weight).
        """
        src = self.source(False)
        B, n, m = self.B, self.n, self.m
        rows = block_rows(B, n, m, self.block_elements)
        acc = torch.zeros(B, dtype=self.dtype, device=self.device)
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            c = src.block(i0, i1)
            if kind == "mean":
                acc += torch.einsum("bi,bij,bj->b", weights_a[:, i0:i1], c, weights_b)
            else:
                mask = (weights_a[:, i0:i1, None] > 0) & (weights_b[:, None, :] > 0)
                blk_max = torch.where(mask, c, torch.full_like(c, -math.inf)).amax(dim=(-1, -2))
                acc = torch.maximum(acc, blk_max)
        if kind == "mean":
            acc = acc / (weights_a.sum(-1) * weights_b.sum(-1)).clamp_min(torch.finfo(self.dtype).tiny)
        return acc

    def _flat(self, t: torch.Tensor, event: int) -> torch.Tensor:
        return t.reshape(self.B, *t.shape[t.dim() - event:])


class CostMatrix(Geometry):
    """A dense cost matrix ``C`` of shape ``(*batch, n, m)``.

    ``C_ij`` is the cost of moving a unit of mass from source point ``i`` to target point ``j``;
    OT solvers minimize ``⟨C, P⟩ = Σ_ij C_ij P_ij`` (plus regularization) over plans ``P``.
    Gradients flow to ``C``.

    Args:
        cost: The cost matrix (any real values; gradients flow to it).
        block_elements: Entries per streamed block (default: about 1 MiB of float32).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import CostMatrix
        >>> geom = CostMatrix(torch.rand(2, 5, 4, dtype=torch.float64))
        >>> geom.batch_shape, geom.n, geom.m
        ((2,), 5, 4)
    """

    def __init__(self, cost: torch.Tensor, *, block_elements: int | None = None) -> None:
        if not isinstance(cost, torch.Tensor) or cost.dim() < 2:
            raise ValueError(f"cost must be a tensor of shape (*batch, n, m), got {getattr(cost, 'shape', cost)}")
        if not cost.is_floating_point():
            raise ValueError(f"cost must be floating point, got {cost.dtype}")
        self.cost = cost
        self.batch_shape = tuple(cost.shape[:-2])
        self.block_elements = block_elements
        # contiguous, detached copies for the fast path, shared with the transpose
        self._cache: dict[bool, torch.Tensor] = {}
        self._is_t = False

    @property
    def n(self) -> int:
        return self.cost.shape[-2]

    @property
    def m(self) -> int:
        return self.cost.shape[-1]

    def source(self, differentiable: bool) -> CostSource:
        c = self._flat(self.cost, 2)
        if differentiable:
            return DenseSource(c)
        if self._is_t not in self._cache:
            other = self._cache.get(not self._is_t)
            if other is not None:  # the transpose is a view of the cached matrix
                return DenseSource(other.transpose(-1, -2))
            self._cache[self._is_t] = c.detach().contiguous()
        return DenseSource(self._cache[self._is_t])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.cost,)

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> CostMatrix:
        return CostMatrix(tensors[0], block_elements=self.block_elements)

    def transpose(self) -> CostMatrix:
        t = CostMatrix(self.cost.transpose(-1, -2), block_elements=self.block_elements)
        t._cache, t._is_t = self._cache, not self._is_t
        return t

    def to_dense(self) -> torch.Tensor:
        return self.cost


class PointCloud(Geometry):
    """Point clouds ``x (*batch, n, d)`` and ``y (*batch, m, d)`` with a ground cost.

    The cost matrix is ``C_ij = c(x_i, y_j)`` for a ground cost ``c`` (``scale · ‖x − y‖²`` by
    default); online, it is recomputed block by block and never stored, so memory is
    ``O(n + m)`` per problem. Gradients flow to ``x`` and ``y`` through ``c``.

    Args:
        x: Source points.
        y: Target points (same batch shape and ``d``).
        cost: :class:`SqEuclidean` (default, ``"sqeuclidean"``), :class:`PNorm` (``"euclidean"``
            is ``PNorm(1)``), :class:`CustomCost` or a callable ``fn(x, y) -> (B, r, m)``.
        online: Evaluate the cost block by block (no ``n × m`` matrix is stored). ``None``
            (default): online above :data:`ONLINE_THRESHOLD` entries.
        block_elements: Entries per streamed block (default: about 1 MiB of float32).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import PointCloud
        >>> x = torch.rand(100, 2, dtype=torch.float64)
        >>> y = torch.rand(80, 2, dtype=torch.float64)
        >>> geom = PointCloud(x, y, online=True)
        >>> geom.to_dense().shape
        torch.Size([100, 80])
        >>> torch.allclose(geom.to_dense(), torch.cdist(x, y) ** 2)
        True
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost: Cost | str | Callable[..., torch.Tensor] = "sqeuclidean",
                 *, online: bool | None = None, block_elements: int | None = None) -> None:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor of shape (*batch, n, d), got "
                                 f"{getattr(t, 'shape', t)}")
        if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share batch shape and d")
        if x.dtype != y.dtype:
            raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
        self.x, self.y = x, y
        self.cost = _resolve_cost(cost)
        self.batch_shape = tuple(x.shape[:-2])
        self.block_elements = block_elements
        entries = math.prod(self.batch_shape) * x.shape[-2] * y.shape[-2]
        self.online = bool(entries > ONLINE_THRESHOLD) if online is None else bool(online)
        self._cache: dict[bool, torch.Tensor] = {}
        self._is_t = False

    @property
    def n(self) -> int:
        return self.x.shape[-2]

    @property
    def m(self) -> int:
        return self.y.shape[-2]

    @property
    def is_online(self) -> bool:
        return self.online

    @property
    def matrix_free_softmin(self) -> bool:
        return self.online and isinstance(self.cost, SqEuclidean)

    def _online_source(self) -> CostSource:
        x, y = self._flat(self.x, 2), self._flat(self.y, 2)
        c = self.cost
        if isinstance(c, SqEuclidean):
            return SqEuclideanSource(x, y, c.scale)
        if isinstance(c, PNorm):
            return PNormSource(x, y, c.p, c.scale)
        return CallableSource(x, y, c.fn)

    def source(self, differentiable: bool) -> CostSource:
        if self.online:
            return self._online_source()
        if differentiable:
            return DenseSource(self._online_source().block(0, self.n))
        if self._is_t not in self._cache:
            other = self._cache.get(not self._is_t)
            if other is not None:  # the transpose is a view of the cached matrix
                return DenseSource(other.transpose(-1, -2))
            with torch.no_grad():
                self._cache[self._is_t] = self._online_source().block(0, self.n).contiguous()
        return DenseSource(self._cache[self._is_t])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.y)

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> PointCloud:
        return PointCloud(tensors[0], tensors[1], self.cost, online=self.online,
                          block_elements=self.block_elements)

    def transpose(self) -> PointCloud:
        cost: Cost = self.cost
        if isinstance(cost, CustomCost):
            fn = cost.fn
            cost = CustomCost(lambda u, v: fn(v, u).transpose(-1, -2))
        t = PointCloud(self.y, self.x, cost, online=self.online, block_elements=self.block_elements)
        t._cache, t._is_t = self._cache, not self._is_t
        return t


def as_geometry(geometry: Geometry | torch.Tensor) -> Geometry:
    """A :class:`Geometry` from a geometry or a dense cost tensor."""
    if isinstance(geometry, Geometry):
        return geometry
    if isinstance(geometry, torch.Tensor):
        return CostMatrix(geometry)
    raise ValueError(f"geometry must be a cost tensor (*batch, n, m) or a Geometry, got {type(geometry).__name__}")


def _geom_flatten(g: Geometry) -> tuple[list[Any], Any]:
    if isinstance(g, CostMatrix):
        return [g.cost], ("dense", g.block_elements)
    assert isinstance(g, PointCloud)
    return [g.x, g.y], ("cloud", g.cost, g.online, g.block_elements)


def _geom_unflatten(values: Any, context: Any) -> Geometry:
    if context[0] == "dense":
        return CostMatrix(values[0], block_elements=context[1])
    return PointCloud(values[0], values[1], context[1], online=context[2], block_elements=context[3])


for _cls in (CostMatrix, PointCloud):
    pytree.register_pytree_node(_cls, _geom_flatten, _geom_unflatten,
                                serialized_type_name=f"optlayers.solvers.ot.{_cls.__name__}")

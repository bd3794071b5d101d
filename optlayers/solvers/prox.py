r"""Differentiable, batched proximal operators of sparsity-inducing penalties.

The proximal operator of a convex function :math:`g` with step :math:`\eta > 0` is

.. math::

    \operatorname{prox}_{\eta g}(x) = \operatorname*{arg\,min}_z \;
    \tfrac{1}{2\eta} \lVert z - x \rVert_2^2 + g(z) .

Each function here evaluates it in closed form (soft thresholding and its block and
elastic-net variants) with out-of-place PyTorch operations, so autograd gives the correct
derivative almost everywhere, and ``torch.func.vmap``/``grad``/``jacrev``/``jacfwd`` work.

**Argument order.** Every prox takes ``(x, lam, ..., step)``. A proximal-gradient solver
(``ProximalGradient``) calls its prox as ``prox(z, step, *params)``; adapt with a lambda::

    prox = lambda z, step, lam: prox_l1(z, lam, step)
    prox = lambda z, step, lam, gamma: prox_elastic_net(z, lam, gamma, step)
    prox = lambda z, step, lam: prox_group_lasso(z, lam, groups, step)  # groups fixed

so that ``lam`` (and ``gamma``) are differentiable ``params``.

**Broadcasting.** For the elementwise operators (:func:`prox_l1`,
:func:`prox_elastic_net`) ``lam``, ``gamma`` and ``step`` broadcast elementwise against
``x`` (per-coordinate weights are allowed; give a per-problem value of batch shape ``(B,)``
as ``(B, 1)``). For the block operators (:func:`prox_l2`, :func:`prox_group_lasso`) they are
one value per vector and broadcast to the *batch shape* (``x.shape`` without the reduced
dim). Numbers or tensors are accepted everywhere; negative ``lam``/``gamma`` or a nonpositive
``step`` raise :class:`ValueError` (for tensors in eager mode only, as value checks are
skipped inside ``torch.func`` transforms and ``torch.compile``).

References:
    Parikh, Boyd (2014). Proximal algorithms. Foundations and Trends in Optimization.
    Zou, Hastie (2005). Regularization and variable selection via the elastic net. JRSS-B.
    Yuan, Lin (2006). Model selection and estimation in regression with grouped variables.
    JRSS-B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from optlayers.solvers.projections import (
    Scalar,
    _ArgumentTypeError,
    _check_input,
    _check_value,
    _normalize_dim,
    _param,
    _unsqueeze_last,
)

__all__ = ["prox_elastic_net", "prox_group_lasso", "prox_l1", "prox_l2"]


def _soft_threshold(x: Tensor, t: Tensor | float) -> Tensor:
    return torch.sign(x) * torch.relu(x.abs() - t)


def prox_l1(x: Tensor, lam: Scalar, step: Scalar = 1.0) -> Tensor:
    r"""Proximal operator of :math:`\lambda \lVert \cdot \rVert_1` (soft thresholding).

    .. math::

        \operatorname{prox}_{\eta\lambda\lVert\cdot\rVert_1}(x)_i
        = \operatorname{sign}(x_i)\max(|x_i| - \eta\lambda, 0) .

    Derivative: :math:`\partial z_i/\partial x_i = [|x_i| > \eta\lambda]`,
    :math:`\partial z_i/\partial \lambda = -\eta \operatorname{sign}(x_i)[|x_i| > \eta\lambda]`.

    Args:
        x: Floating tensor of any shape.
        lam: Weight :math:`\lambda \ge 0`: a number or a tensor broadcastable to ``x.shape``
            (per-coordinate weights allowed).
        step: Step size :math:`\eta > 0`: a number or a tensor broadcastable to ``x.shape``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor, ``lam < 0``, ``step <= 0``, or a parameter
            not broadcastable to ``x.shape``.

    Example:
        >>> import torch
        >>> prox_l1(torch.tensor([3.0, -0.5, -2.0]), 1.0)
        tensor([ 2., -0., -1.])
    """
    _check_input(x)
    lam_ = _param(lam, "lam", x, x.shape, what="shape of x")
    step_ = _param(step, "step", x, x.shape, strict=True, what="shape of x")
    return _soft_threshold(x, lam_ * step_)


def prox_elastic_net(x: Tensor, lam: Scalar, gamma: Scalar, step: Scalar = 1.0) -> Tensor:
    r"""Proximal operator of the elastic net :math:`\lambda\lVert z\rVert_1 + \tfrac{\gamma}{2}\lVert z\rVert_2^2`.

    .. math::

        \operatorname{prox}(x)_i
        = \frac{\operatorname{sign}(x_i)\max(|x_i| - \eta\lambda, 0)}{1 + \eta\gamma} .

    Args:
        x: Floating tensor of any shape.
        lam: L1 weight :math:`\lambda \ge 0`: a number or a tensor broadcastable to ``x.shape``.
        gamma: L2 weight :math:`\gamma \ge 0`: a number or a tensor broadcastable to
            ``x.shape``.
        step: Step size :math:`\eta > 0`: a number or a tensor broadcastable to ``x.shape``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor, ``lam < 0``, ``gamma < 0``, ``step <= 0``, or
            a parameter not broadcastable to ``x.shape``.

    Example:
        >>> import torch
        >>> prox_elastic_net(torch.tensor([3.0, -0.5]), 1.0, 1.0)
        tensor([1., -0.])
    """
    _check_input(x)
    lam_ = _param(lam, "lam", x, x.shape, what="shape of x")
    gamma_ = _param(gamma, "gamma", x, x.shape, what="shape of x")
    step_ = _param(step, "step", x, x.shape, strict=True, what="shape of x")
    return _soft_threshold(x, lam_ * step_) / (1.0 + gamma_ * step_)


def _block_scale(sq: Tensor, t: Tensor | float) -> Tensor:
    r"""Return :math:`\max(1 - t/\sqrt{sq}, 0)` with finite values and derivatives at ``sq = 0``."""
    active = sq > t * t
    safe = torch.sqrt(torch.where(active, sq, torch.ones_like(sq)))
    return torch.where(active, 1.0 - t / safe, torch.zeros_like(sq))


def prox_l2(x: Tensor, lam: Scalar, step: Scalar = 1.0, *, dim: int = -1) -> Tensor:
    r"""Proximal operator of :math:`\lambda \lVert \cdot \rVert_2` (block soft thresholding).

    The norm is the plain (not squared) Euclidean norm of each slice along ``dim``:

    .. math::

        \operatorname{prox}_{\eta\lambda\lVert\cdot\rVert_2}(x)
        = \max\Big(1 - \frac{\eta\lambda}{\lVert x \rVert_2}, 0\Big)\, x .

    Finite values and gradients at ``x = 0``.

    Args:
        x: Floating tensor; each slice along ``dim`` is one block.
        lam: Weight :math:`\lambda \ge 0`: a number or a tensor broadcastable to the batch
            shape (``x.shape`` without ``dim``).
        step: Step size :math:`\eta > 0`: a number or a tensor broadcastable to the batch
            shape.
        dim: Dimension holding the vector.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor or 0-d, ``dim`` out of range, ``lam < 0``,
            ``step <= 0``, or a parameter not broadcastable to the batch shape.

    Example:
        >>> import torch
        >>> prox_l2(torch.tensor([3.0, 4.0]), 1.0)
        tensor([2.4000, 3.2000])
    """
    _check_input(x)
    d = _normalize_dim(dim, x.ndim)
    xt = x.movedim(d, -1)
    lam_ = _param(lam, "lam", x, xt.shape[:-1])
    step_ = _param(step, "step", x, xt.shape[:-1], strict=True)
    t = _unsqueeze_last(lam_ * step_)
    sq = (xt * xt).sum(dim=-1, keepdim=True)
    return (xt * _block_scale(sq, t)).movedim(-1, d)


def _group_ids(groups: Tensor | Sequence[Tensor], n: int, device: torch.device) -> tuple[Tensor, int]:
    """Return per-coordinate labels in ``[0, G)`` (``-1``: unpenalised) and ``G``."""
    if isinstance(groups, Tensor):
        if groups.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.int8,
            torch.uint8,
        ):
            raise ValueError(f"groups must be an integer tensor of group ids, got {groups.dtype}")
        if groups.shape != (n,):
            raise ValueError(
                f"groups must have shape (n,) = ({n},) (one group id per coordinate of x), "
                f"got shape {tuple(groups.shape)}"
            )
        groups = groups.to(device=device, dtype=torch.int64)
        _check_value(groups >= 0, "groups must hold nonnegative group ids")
        uniq, ids = torch.unique(groups, sorted=True, return_inverse=True)
        return ids, uniq.numel()
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise _ArgumentTypeError(
            f"groups must be an int64 tensor of shape (n,) or a sequence of index tensors, got {type(groups).__name__}"
        )
    ids = torch.full((n,), -1, dtype=torch.int64, device=device)
    count = torch.zeros(n, dtype=torch.int64, device=device)
    for g, idx in enumerate(groups):
        if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.is_complex():
            raise _ArgumentTypeError(f"groups[{g}] must be an integer tensor of coordinate indices")
        idx = idx.to(device=device, dtype=torch.int64).reshape(-1)
        _check_value((idx >= -n) & (idx < n), f"groups[{g}] has indices out of range for n = {n}")
        idx = idx % n
        ids = ids.index_fill(0, idx, g)
        count = count.index_add(0, idx, torch.ones_like(idx))
    _check_value(count <= 1, "groups must be disjoint (a coordinate is in two groups)")
    return ids, len(groups)


def prox_group_lasso(
    x: Tensor,
    lam: Scalar,
    groups: Tensor | Sequence[Tensor],
    step: Scalar = 1.0,
    *,
    weights: Tensor | None = None,
) -> Tensor:
    r"""Proximal operator of the group lasso :math:`\lambda \sum_g w_g \lVert z_g \rVert_2`.

    Block soft thresholding of each group of coordinates of the last dimension:

    .. math::

        \operatorname{prox}(x)_g = \max\Big(1 - \frac{\eta\lambda w_g}{\lVert x_g \rVert_2},
        0\Big)\, x_g .

    **Group convention.** ``x`` has shape ``(..., n)`` and the groups partition (part of) the
    last dimension; they are the same for every batch element. ``groups`` is either

    * an integer tensor of shape ``(n,)`` holding a nonnegative group id for every coordinate
      (ids need not be contiguous; groups are ordered by increasing id), or
    * a sequence of ``G`` integer index tensors, one per group, pairwise disjoint; coordinates
      listed in no group are *unpenalised* (returned unchanged), e.g. an intercept.

    Args:
        x: Floating tensor of shape ``(..., n)``.
        lam: Weight :math:`\lambda \ge 0`: a number or a tensor broadcastable to the batch
            shape ``x.shape[:-1]``.
        groups: Group assignment, see above. Not differentiated.
        step: Step size :math:`\eta > 0`: a number or a tensor broadcastable to the batch
            shape.
        weights: Optional nonnegative per-group weights :math:`w_g` of shape ``(G,)`` in group
            order (a common choice is :math:`\sqrt{|g|}`); default all ones.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor of shape ``(..., n)``, invalid ``groups``
            (wrong shape or dtype, negative ids, out-of-range or overlapping indices),
            ``weights`` not of shape ``(G,)`` or negative, ``lam < 0``, or ``step <= 0``.

    Example:
        >>> import torch
        >>> prox_group_lasso(torch.tensor([3.0, 4.0, 0.5]), 1.0, torch.tensor([0, 0, 1]))
        tensor([2.4000, 3.2000, 0.0000])
    """
    _check_input(x, min_ndim=1)
    n = x.shape[-1]
    batch = x.shape[:-1]
    lam_ = _param(lam, "lam", x, batch)
    step_ = _param(step, "step", x, batch, strict=True)
    ids, num_groups = _group_ids(groups, n, x.device)
    penalized = ids >= 0
    t = _unsqueeze_last(lam_ * step_)
    if weights is not None:
        _check_input(weights, "weights", min_ndim=1)
        if weights.shape != (num_groups,):
            raise ValueError(
                f"weights must have shape (G,) = ({num_groups},), one per group, got shape {tuple(weights.shape)}"
            )
        weights = weights.to(dtype=x.dtype, device=x.device)
        _check_value(weights >= 0, "weights must be >= 0")
        t = t * weights
    safe_ids = torch.where(penalized, ids, torch.zeros_like(ids))
    sq = x * x
    sq = torch.where(penalized, sq, torch.zeros_like(sq))
    group_sq = sq.new_zeros((*batch, num_groups)).index_add(-1, safe_ids, sq)
    scale = _block_scale(group_sq, t).index_select(-1, safe_ids)
    scale = torch.where(penalized, scale, torch.ones_like(scale))
    return x * scale

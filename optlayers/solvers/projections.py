r"""Differentiable, batched Euclidean projections onto simple convex (and sparse) sets.

Every function computes

.. math::

    \Pi_C(x) = \operatorname*{arg\,min}_{z \in C} \tfrac12 \lVert z - x \rVert_2^2

in closed form (sorting, thresholding, clamping) with ordinary, out-of-place PyTorch operations.
The closed forms are piecewise smooth, so autograd gives the correct derivative almost
everywhere (everywhere except on the measure-zero set of kinks where the active set changes).
No value-dependent Python control flow is used: the functions work under ``torch.func.vmap``,
``grad``, ``jacrev`` and ``jacfwd``, on any device and in any floating dtype.

Conventions shared by all functions:

* ``x`` is a floating-point tensor; leading dimensions are batch dimensions. Functions with a
  ``dim`` argument project each slice along ``dim``; the *batch shape* is ``x.shape`` with
  ``dim`` removed. Size parameters (``s``, ``radius``) are Python numbers or tensors that
  broadcast to that batch shape (one value per projected vector) and are differentiable.
* The output has the shape and dtype of ``x``.
* Invalid arguments raise :class:`ValueError` naming the argument. Checks on the *values* of
  tensor arguments (e.g. a negative radius) run in eager mode only: inside ``torch.func``
  transforms and ``torch.compile`` they are skipped, because they need a host synchronisation.

References:
    Held, Wolfe, Crowder (1974). Validation of subgradient optimization. Math. Programming.
    Duchi, Shalev-Shwartz, Singer, Chandra (2008). Efficient projections onto the l1-ball
    for learning in high dimensions. ICML.
    Condat (2016). Fast projection onto the simplex and the l1 ball. Math. Programming.
    Kyrillidis, Becker, Cevher, Koch (2013). Sparse projections onto the simplex. ICML.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = [
    "project_box",
    "project_halfspace",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "project_nonnegative",
    "project_simplex",
    "project_sparse_simplex",
]

Scalar = float | int | Tensor


# --------------------------------------------------------------------------------------------
# Validation helpers (shared with ``prox.py``)
# --------------------------------------------------------------------------------------------


class _ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong Python type: both a ``TypeError`` and a ``ValueError``."""


def _is_concrete(t: Tensor) -> bool:
    """Whether value checks on ``t`` may run (eager, not traced by torch.func/compile)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta":
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return is_wrapped is None or not is_wrapped(t)


def _check_input(x: object, name: str = "x", *, min_ndim: int = 0) -> Tensor:
    """Check that ``x`` is a real floating-point tensor with at least ``min_ndim`` dims."""
    if not isinstance(x, Tensor):
        raise _ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s) (shape (..., n)), got shape {tuple(x.shape)}"
        )
    return x


def _normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    """Return ``dim`` as a nonnegative index into a tensor with ``ndim`` dimensions."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise _ArgumentTypeError(f"{name} must be an int, got {type(dim).__name__}")
    dim = int(dim)
    if ndim == 0:
        raise ValueError("x must have at least one dimension to project along dim, got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimension(s)")
    return dim % ndim


def _check_value(ok: Tensor | bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` holds (tensor: everywhere, eager only)."""
    if isinstance(ok, Tensor):
        if _is_concrete(ok) and not bool(ok.all()):
            raise ValueError(message)
    elif not ok:
        raise ValueError(message)


def _param(
    value: Scalar,
    name: str,
    x: Tensor,
    shape: torch.Size | tuple[int, ...],
    *,
    minimum: float = 0.0,
    strict: bool = False,
    what: str = "batch shape",
) -> Tensor | float:
    """Validate a scalar parameter (number or tensor broadcastable to ``shape``).

    Numbers are returned as Python floats; tensors are cast to ``x.dtype`` (differentiably)
    and checked to broadcast to ``shape`` without enlarging it. ``value >= minimum`` (or
    ``> minimum`` if ``strict``) is enforced.
    """
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if isinstance(value, bool):
        raise _ArgumentTypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(value, numbers.Real):
        v = float(value)
        if not (v > minimum if strict else v >= minimum):
            raise ValueError(f"{name} must be {bound}, got {v:g}")
        return v
    if not isinstance(value, Tensor):
        raise _ArgumentTypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be a real number or real tensor, got dtype {value.dtype}")
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(value.shape)} must broadcast to the {what} {tuple(shape)}")
    value = value.to(dtype=x.dtype)
    _check_value(value > minimum if strict else value >= minimum, f"{name} must be {bound}")
    return value


def _unsqueeze_last(p: Tensor | float) -> Tensor | float:
    """Append a trailing singleton dim to a batch-shaped parameter (numbers pass through)."""
    return p.unsqueeze(-1) if isinstance(p, Tensor) else p


# --------------------------------------------------------------------------------------------
# Simplex
# --------------------------------------------------------------------------------------------


def _simplex_last(x: Tensor, s: Tensor | float) -> Tensor:
    """Sort-based simplex projection along the last dim; ``s`` is batch-shaped or a number."""
    if x.dtype in (torch.float16, torch.bfloat16):  # cumsum and the counts k need more bits
        s32 = s.float() if isinstance(s, Tensor) else s
        return _simplex_last(x.float(), s32).to(x.dtype)
    n = x.shape[-1]
    u, _ = torch.sort(x, dim=-1, descending=True)
    cssv = torch.cumsum(u, dim=-1) - _unsqueeze_last(s)
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    # The condition holds exactly on a prefix of the sorted order; rho is its length.
    rho = (u * k > cssv).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = torch.gather(cssv, -1, rho - 1) / rho.to(x.dtype)
    return torch.relu(x - tau)


def project_simplex(x: Tensor, s: Scalar = 1.0, *, dim: int = -1) -> Tensor:
    r"""Euclidean projection onto the simplex :math:`\Delta_s = \{p \ge 0,\ \sum_i p_i = s\}`.

    .. math::

        \Pi_{\Delta_s}(x)_i = \max(x_i - \tau, 0), \qquad
        \tau = \frac{1}{\rho}\Big(\sum_{j=1}^{\rho} u_j - s\Big),

    where :math:`u_1 \ge \dots \ge u_n` is ``x`` sorted and :math:`\rho` the largest
    :math:`k` with :math:`u_k > (\sum_{j \le k} u_j - s)/k` (Held et al. 1974; Duchi et al.
    2008; Condat 2016). ``O(n log n)`` per vector.

    On the support :math:`S = \{i : p_i > 0\}` the Jacobian is
    :math:`\partial p_S / \partial x_S = I - \mathbf 1 \mathbf 1^\top / |S|` (zero elsewhere)
    and :math:`\partial p_S / \partial s = \mathbf 1 / |S|`; autograd reproduces both.

    Args:
        x: Floating tensor of shape ``(..., n, ...)``; projected along ``dim``.
        s: Total mass :math:`s \ge 0`: a number or a tensor broadcastable to the batch shape
            (``x.shape`` without ``dim``). Differentiable.
        dim: Dimension to project along.

    Returns:
        Tensor of the shape and dtype of ``x``, each slice along ``dim`` in :math:`\Delta_s`.

    Raises:
        ValueError: ``x`` not a floating tensor or 0-d, ``dim`` out of range, ``s`` negative or
            not broadcastable to the batch shape.

    Example:
        >>> import torch
        >>> project_simplex(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])
    """
    _check_input(x)
    d = _normalize_dim(dim, x.ndim)
    xt = x.movedim(d, -1)
    s_ = _param(s, "s", x, xt.shape[:-1])
    return _simplex_last(xt, s_).movedim(-1, d)


def project_sparse_simplex(x: Tensor, k: int, s: Scalar = 1.0, *, dim: int = -1) -> Tensor:
    r"""Euclidean projection onto the ``k``-sparse simplex.

    .. math::

        \Pi(x) = \operatorname*{arg\,min}_{p \in \Delta_s,\ \lVert p \rVert_0 \le k}
        \lVert p - x \rVert_2^2 .

    The set is not convex, but the projection is exact and cheap (Kyrillidis et al. 2013,
    GSHP): keep the ``k`` largest entries of ``x``, project them onto :math:`\Delta_s` with
    :func:`project_simplex`, and set the others to zero. Where the ``k``-th and
    ``(k+1)``-th largest entries tie, the projection is not unique and one minimiser is
    returned. The derivative is that of :func:`project_simplex` on the selected entries
    (valid almost everywhere), zero elsewhere.

    Args:
        x: Floating tensor; projected along ``dim``.
        k: Maximum number of nonzeros, an int ``>= 1``; ``k >= n`` gives
            :func:`project_simplex`.
        s: Total mass :math:`s \ge 0`: a number or a tensor broadcastable to the batch shape.
        dim: Dimension to project along.

    Returns:
        Tensor of the shape and dtype of ``x`` with at most ``k`` nonzeros per slice.

    Raises:
        ValueError: invalid ``x``, ``dim`` or ``s`` (as in :func:`project_simplex`), or ``k``
            not an int ``>= 1``.

    Example:
        >>> import torch
        >>> project_sparse_simplex(torch.tensor([0.5, 1.0, 0.9]), k=2)
        tensor([0.0000, 0.5500, 0.4500])
    """
    _check_input(x)
    d = _normalize_dim(dim, x.ndim)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise _ArgumentTypeError(f"k must be an int >= 1, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be an int >= 1, got {k}")
    xt = x.movedim(d, -1)
    s_ = _param(s, "s", x, xt.shape[:-1])
    n = xt.shape[-1]
    if k >= n:
        return _simplex_last(xt, s_).movedim(-1, d)
    vals, idx = torch.topk(xt, k, dim=-1)
    proj = _simplex_last(vals, s_)
    out = torch.zeros_like(xt).scatter(-1, idx, proj)
    return out.movedim(-1, d)


# --------------------------------------------------------------------------------------------
# Norm balls
# --------------------------------------------------------------------------------------------


def project_l1_ball(x: Tensor, radius: Scalar = 1.0, *, dim: int = -1) -> Tensor:
    r"""Euclidean projection onto the L1 ball :math:`\{z : \lVert z \rVert_1 \le r\}`.

    .. math::

        \Pi(x) = \begin{cases} x & \lVert x \rVert_1 \le r \\
        \operatorname{sign}(x) \odot \Pi_{\Delta_r}(|x|) & \text{otherwise,} \end{cases}

    i.e. soft thresholding :math:`\operatorname{sign}(x_i)\max(|x_i| - \tau, 0)` with the
    threshold :math:`\tau > 0` of the simplex projection of :math:`|x|` (Duchi et al. 2008).
    Differentiable almost everywhere in ``x`` and ``radius``.

    Args:
        x: Floating tensor; projected along ``dim``.
        radius: :math:`r \ge 0`: a number or a tensor broadcastable to the batch shape.
        dim: Dimension to project along.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor or 0-d, ``dim`` out of range, ``radius``
            negative or not broadcastable to the batch shape.

    Example:
        >>> import torch
        >>> project_l1_ball(torch.tensor([2.0, -1.0, 0.1]), 2.0)
        tensor([ 1.5000, -0.5000,  0.0000])
    """
    _check_input(x)
    d = _normalize_dim(dim, x.ndim)
    xt = x.movedim(d, -1)
    r = _param(radius, "radius", x, xt.shape[:-1])
    a = xt.abs()
    inside = a.sum(dim=-1, keepdim=True) <= _unsqueeze_last(r)
    proj = torch.sign(xt) * _simplex_last(a, r)
    return torch.where(inside, xt, proj).movedim(-1, d)


def project_l2_ball(x: Tensor, radius: Scalar = 1.0, *, dim: int = -1) -> Tensor:
    r"""Euclidean projection onto the L2 ball :math:`\{z : \lVert z \rVert_2 \le r\}`.

    .. math::

        \Pi(x) = x \cdot \frac{r}{\max(\lVert x \rVert_2, r)} .

    Outside the ball the Jacobian is
    :math:`\frac{r}{\lVert x \rVert}(I - \hat x \hat x^\top)`, :math:`\hat x = x/\lVert x \rVert`;
    inside it is the identity. The formula is guarded so that ``x = 0`` (and ``r = 0``)
    gives finite values and gradients.

    Args:
        x: Floating tensor; projected along ``dim``.
        radius: :math:`r \ge 0`: a number or a tensor broadcastable to the batch shape.
        dim: Dimension to project along.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor or 0-d, ``dim`` out of range, ``radius``
            negative or not broadcastable to the batch shape.

    Example:
        >>> import torch
        >>> project_l2_ball(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    _check_input(x)
    d = _normalize_dim(dim, x.ndim)
    xt = x.movedim(d, -1)
    r = _unsqueeze_last(_param(radius, "radius", x, xt.shape[:-1]))
    norm = torch.linalg.vector_norm(xt, dim=-1, keepdim=True)
    outside = norm > r
    safe = torch.where(outside, norm, torch.ones_like(norm))
    scale = torch.where(outside, r / safe, torch.ones_like(norm))
    return (xt * scale).movedim(-1, d)


def project_linf_ball(x: Tensor, radius: Scalar = 1.0, *, dim: int = -1) -> Tensor:
    r"""Euclidean projection onto the L-infinity ball :math:`\{z : \lVert z \rVert_\infty \le r\}`.

    .. math::

        \Pi(x)_i = \min(\max(x_i, -r), r) .

    Args:
        x: Floating tensor; projected along ``dim``.
        radius: :math:`r \ge 0`: a number or a tensor broadcastable to the batch shape
            (``x.shape`` without ``dim``). Differentiable.
        dim: Dimension to project along.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor or 0-d, ``dim`` out of range, ``radius``
            negative or not broadcastable to the batch shape.

    Example:
        >>> import torch
        >>> project_linf_ball(torch.tensor([2.0, -0.5, -3.0]))
        tensor([ 1.0000, -0.5000, -1.0000])
    """
    _check_input(x)
    d = _normalize_dim(dim, x.ndim)
    xt = x.movedim(d, -1)
    r = _param(radius, "radius", x, xt.shape[:-1])
    if isinstance(r, float):
        out = torch.clamp(xt, -r, r)
    else:
        rr = r.unsqueeze(-1)
        out = torch.minimum(torch.maximum(xt, -rr), rr)
    return out.movedim(-1, d)


# --------------------------------------------------------------------------------------------
# Orthant, box, halfspace
# --------------------------------------------------------------------------------------------


def project_nonnegative(x: Tensor) -> Tensor:
    r"""Euclidean projection onto the nonnegative orthant: :math:`\Pi(x) = \max(x, 0)`.

    Args:
        x: Floating tensor of any shape (elementwise).

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor.

    Example:
        >>> import torch
        >>> project_nonnegative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    _check_input(x)
    return torch.relu(x)


def _bound(value: Scalar | None, name: str, x: Tensor, fill: float) -> Tensor | float:
    if value is None:
        return fill
    if isinstance(value, bool):
        raise _ArgumentTypeError(f"{name} must be a number, a tensor or None, got bool")
    if isinstance(value, numbers.Real):
        return float(value)
    if not isinstance(value, Tensor):
        raise _ArgumentTypeError(f"{name} must be a number, a tensor or None, got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be real, got dtype {value.dtype}")
    try:
        ok = torch.broadcast_shapes(value.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(value.shape)} must broadcast to the shape of x {tuple(x.shape)}")
    return value.to(dtype=x.dtype)


def project_box(x: Tensor, lower: Scalar | None, upper: Scalar | None) -> Tensor:
    r"""Euclidean projection onto the box :math:`\{z : l \le z \le u\}` (elementwise clamp).

    .. math::

        \Pi(x)_i = \min(\max(x_i, l_i), u_i) .

    Gradients flow to ``x`` where :math:`l_i < x_i < u_i` and to the bound that is active
    otherwise.

    Args:
        x: Floating tensor of any shape.
        lower: Lower bound :math:`l`: a number, a tensor broadcastable to ``x.shape``, or
            ``None`` (:math:`-\infty`).
        upper: Upper bound :math:`u`: a number, a tensor broadcastable to ``x.shape``, or
            ``None`` (:math:`+\infty`).

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: ``x`` not a floating tensor, a bound not broadcastable to ``x.shape``, or
            ``lower > upper`` anywhere.

    Example:
        >>> import torch
        >>> project_box(torch.tensor([-2.0, 0.5, 3.0]), 0.0, torch.tensor([1.0, 1.0, 2.0]))
        tensor([0.0000, 0.5000, 2.0000])
    """
    _check_input(x)
    lo = _bound(lower, "lower", x, float("-inf"))
    hi = _bound(upper, "upper", x, float("inf"))
    if isinstance(lo, float) and isinstance(hi, float):
        if not lo <= hi:
            raise ValueError(f"lower must be <= upper everywhere, got lower={lo:g} > upper={hi:g}")
        return torch.clamp(x, lo, hi)
    if isinstance(lo, Tensor) and isinstance(hi, Tensor):
        _check_value(lo <= hi, "lower must be <= upper everywhere")
    elif isinstance(lo, Tensor):
        _check_value(lo <= hi, f"lower must be <= upper={hi:g} everywhere")
    elif isinstance(hi, Tensor):
        _check_value(hi >= lo, f"upper must be >= lower={lo:g} everywhere")
    out = x
    if isinstance(lo, Tensor):
        out = torch.maximum(out, lo)
    elif lo != float("-inf"):
        out = torch.clamp(out, min=lo)
    if isinstance(hi, Tensor):
        out = torch.minimum(out, hi)
    elif hi != float("inf"):
        out = torch.clamp(out, max=hi)
    return out


def project_halfspace(x: Tensor, a: Tensor, b: Scalar) -> Tensor:
    r"""Euclidean projection onto the halfspace :math:`\{z : a^\top z \le b\}` (last dim).

    .. math::

        \Pi(x) = x - \frac{\max(a^\top x - b, 0)}{\lVert a \rVert_2^2}\, a .

    ``x``, ``a`` and ``b`` broadcast against each other over the batch dimensions (the
    output has the broadcast shape). Differentiable in ``x``, ``a`` and ``b`` almost
    everywhere. If :math:`a = 0` the set is all of :math:`\mathbb R^n` when :math:`b \ge 0`
    (``x`` is returned) and empty when :math:`b < 0`: that raises in eager mode and gives
    NaN inside ``torch.func`` transforms.

    Args:
        x: Floating tensor of shape ``(..., n)``.
        a: Normal vector, tensor of shape ``(..., n)``.
        b: Offset: a number or a tensor of shape ``(...)`` (broadcastable).

    Returns:
        Tensor of shape ``broadcast(x, a)`` and the dtype of ``x``.

    Raises:
        ValueError: ``x`` or ``a`` not floating tensors of shape ``(..., n)`` with the same
            ``n``, shapes that do not broadcast, or an empty halfspace (:math:`a = 0`,
            :math:`b < 0`).

    Example:
        >>> import torch
        >>> project_halfspace(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), 2.0)
        tensor([1., 1.])
    """
    _check_input(x, min_ndim=1)
    _check_input(a, "a", min_ndim=1)
    if a.shape[-1] != x.shape[-1]:
        raise ValueError(f"a must have shape (..., n) with n = x.shape[-1] = {x.shape[-1]}, got shape {tuple(a.shape)}")
    try:
        batch = torch.broadcast_shapes(x.shape[:-1], a.shape[:-1])
    except RuntimeError:
        raise ValueError(f"the batch shapes of x {tuple(x.shape)} and a {tuple(a.shape)} do not broadcast") from None
    if isinstance(b, Tensor):
        try:
            batch = torch.broadcast_shapes(batch, b.shape)
        except RuntimeError:
            raise ValueError(
                f"b of shape {tuple(b.shape)} must broadcast with the batch shape {tuple(batch)}"
            ) from None
        if b.is_complex() or b.dtype == torch.bool:
            raise ValueError(f"b must be real, got dtype {b.dtype}")
        b_: Tensor | float = b.to(dtype=x.dtype)
    elif isinstance(b, numbers.Real) and not isinstance(b, bool):
        b_ = float(b)
    else:
        raise _ArgumentTypeError(f"b must be a number or a tensor, got {type(b).__name__}")
    a = a.to(dtype=x.dtype)
    sq = (a * a).sum(dim=-1)
    zero = sq == 0
    viol = torch.relu((a * x).sum(dim=-1) - b_)
    _check_value(~(zero & (viol > 0)), "the halfspace is empty: a = 0 with b < 0")
    coef = viol / torch.where(zero, torch.ones_like(sq), sq)
    coef = torch.where(zero & (viol > 0), torch.full_like(coef, float("nan")), coef)
    return x - coef.unsqueeze(-1) * a

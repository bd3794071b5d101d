"""Validation and batching of LP / diagonal-QP data in SciPy's ``linprog`` conventions.

Internally every problem is stored in the PDLP form

    min cᵀx + ½ xᵀ diag(q) x   s.t.   K x (= | ≥) rhs,   l ≤ x ≤ u,

with the equality rows first: ``K = [A_eq; −A_ub]``, ``rhs = [b_eq; −b_ub]``. Batch dimensions
are flattened to one leading dimension ``B``; a dense ``A`` may be shared (``(1, m, n)``) or
batched, a sparse ``A`` is always shared.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .preconditioning import LinOp

__all__ = ["LPData", "prepare_lp", "parse_bounds"]


@dataclasses.dataclass
class LPData:
    """An LP/QP batch in PDLP form (see the module docstring).

    Attributes:
        c, q, rhs, lower, upper: ``(B, n)``, ``(B, n)``, ``(B, m)``, ``(B, n)``, ``(B, n)``.
        K: The stacked constraint operator ``[A_eq; −A_ub]``.
        n_eq: Number of equality rows (the first rows of ``K``).
        batch_shape: The broadcast batch shape of the inputs (``()`` when unbatched).
        has_q: Whether a quadratic term was given.
    """

    c: Tensor
    q: Tensor
    rhs: Tensor
    lower: Tensor
    upper: Tensor
    K: LinOp
    n_eq: int
    batch_shape: torch.Size
    has_q: bool

    @property
    def B(self) -> int:
        return self.c.shape[0]

    @property
    def n(self) -> int:
        return self.c.shape[-1]

    @property
    def m(self) -> int:
        return self.rhs.shape[-1]

    @property
    def eq_mask(self) -> Tensor:
        mask = torch.zeros(self.m, dtype=torch.bool, device=self.c.device)
        mask[: self.n_eq] = True
        return mask


def _as_tensor(x: Any, name: str, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            x = x.to(like.dtype)
        if x.dtype != like.dtype or x.device != like.device:
            raise TypeError(f"{name} has dtype/device {x.dtype}/{x.device} but c has {like.dtype}/{like.device}")
        return x
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _is_scalar_bound(v: Any) -> bool:
    return v is None or isinstance(v, numbers.Real) or (isinstance(v, Tensor) and v.dim() == 0)


def parse_bounds(bounds: Any, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """SciPy-style ``bounds`` → ``(lower, upper)`` tensors of shape ``(*b, n)``.

    Accepted: ``None`` (``(0, None)`` is SciPy's default; ``None`` here means free variables,
    as in SciPy's ``bounds=(None, None)``), one ``(min, max)`` pair for all variables, a
    sequence of ``n`` pairs, or a pair of tensors ``(lower, upper)`` of shape ``(*batch, n)``.
    ``None`` and ``±inf`` mean unbounded.
    """
    inf = float("inf")
    if bounds is None:
        bounds = (None, None)
    if isinstance(bounds, Tensor):
        if bounds.shape[-1] != 2 or bounds.dim() < 2:
            raise ValueError(f"a bounds tensor must have shape (*batch, n, 2), got {tuple(bounds.shape)}")
        return _as_tensor(bounds[..., 0], "bounds", like), _as_tensor(bounds[..., 1], "bounds", like)
    if not isinstance(bounds, Sequence):
        raise ValueError(f"bounds must be None, a (min, max) pair or a sequence of n pairs, got {bounds!r}")
    if len(bounds) == 2 and all(_is_scalar_bound(v) for v in bounds):
        lo = -inf if bounds[0] is None else bounds[0]
        hi = inf if bounds[1] is None else bounds[1]
        lo_t = _as_tensor(lo, "bounds", like).expand(n).clone()
        hi_t = _as_tensor(hi, "bounds", like).expand(n).clone()
        return lo_t, hi_t
    if len(bounds) == 2 and all(isinstance(v, Tensor) and v.dim() >= 1 for v in bounds):
        return _as_tensor(bounds[0], "bounds", like), _as_tensor(bounds[1], "bounds", like)
    if len(bounds) != n:
        raise ValueError(f"bounds must be one (min, max) pair or n={n} pairs, got {len(bounds)} entries")
    lo_l, hi_l = [], []
    for i, pair in enumerate(bounds):
        if pair is None:
            pair = (None, None)
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"bounds[{i}] must be a (min, max) pair, got {pair!r}")
        lo_l.append(-inf if pair[0] is None else float(pair[0]))
        hi_l.append(inf if pair[1] is None else float(pair[1]))
    return (torch.tensor(lo_l, dtype=like.dtype, device=like.device),
            torch.tensor(hi_l, dtype=like.dtype, device=like.device))


def _dense_or_sparse(A: Any, name: str, like: Tensor) -> Tensor:
    if isinstance(A, Tensor) and A.layout != torch.strided:
        if A.dtype != like.dtype or A.device != like.device:
            raise TypeError(f"{name} has dtype/device {A.dtype}/{A.device} but c has {like.dtype}/{like.device}")
        return A
    if not isinstance(A, Tensor):
        try:
            import scipy.sparse as sp
            if sp.issparse(A):
                coo = A.tocoo()
                idx = torch.as_tensor(__import__("numpy").vstack([coo.row, coo.col]), dtype=torch.int64)
                return torch.sparse_coo_tensor(idx, torch.as_tensor(coo.data, dtype=like.dtype),
                                               coo.shape, device=like.device, check_invariants=False).coalesce()
        except ImportError:  # pragma: no cover
            pass
    return _as_tensor(A, name, like)


def _stack_sparse(parts: list[Tensor], n: int) -> Tensor:
    rows, cols, vals, off = [], [], [], 0
    for P in parts:
        coo = P.to_sparse_coo().coalesce()
        idx = coo.indices()
        rows.append(idx[0] + off)
        cols.append(idx[1])
        vals.append(coo.values())
        off += P.shape[0]
    return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (off, n),
                                   check_invariants=False).coalesce()


def prepare_lp(c: Any, A_ub: Any = None, b_ub: Any = None, A_eq: Any = None, b_eq: Any = None,
               bounds: Any = (0, None), q: Any = None) -> LPData:
    """Validate and batch LP/QP data given in SciPy's ``linprog`` conventions.

    Raises:
        ValueError: On inconsistent shapes, or a matrix given without its right-hand side.
        TypeError: On mixed dtypes/devices.
    """
    if not isinstance(c, Tensor):
        c = torch.as_tensor(c, dtype=torch.float64)
    if not c.is_floating_point():
        c = c.to(torch.get_default_dtype())
    if c.dim() < 1:
        raise ValueError(f"c must have shape (*batch, n), got {tuple(c.shape)}")
    n = c.shape[-1]
    if (A_ub is None) != (b_ub is None):
        raise ValueError("A_ub and b_ub must be given together")
    if (A_eq is None) != (b_eq is None):
        raise ValueError("A_eq and b_eq must be given together")
    mats: list[Any] = []
    vecs: list[Any] = []
    batch_shapes: list[Any] = [c.shape[:-1]]
    sparse = False
    for A, b, sign, name in ((A_eq, b_eq, 1.0, "A_eq"), (A_ub, b_ub, -1.0, "A_ub")):
        if A is None:
            mats.append(None)
            vecs.append(c.new_zeros(0))
            continue
        A = _dense_or_sparse(A, name, c)
        b = _as_tensor(b, "b" + name[1:], c)
        if A.dim() < 2 or A.shape[-1] != n:
            raise ValueError(f"{name} must have shape (*batch, m, n={n}), got {tuple(A.shape)}")
        if b.dim() < 1 or b.shape[-1] != A.shape[-2]:
            raise ValueError(f"b{name[1:]} must have shape (*batch, {A.shape[-2]}), got {tuple(b.shape)}")
        if A.layout != torch.strided:
            sparse = True
        else:
            batch_shapes.append(A.shape[:-2])
        batch_shapes.append(b.shape[:-1])
        mats.append(A * sign)
        vecs.append(b * sign)
    n_eq = 0 if mats[0] is None else mats[0].shape[-2]
    lower, upper = parse_bounds(bounds, n, c)
    if lower.shape[-1] != n or upper.shape[-1] != n:
        raise ValueError(f"bounds must give n={n} values, got {tuple(lower.shape)} and {tuple(upper.shape)}")
    batch_shapes += [lower.shape[:-1], upper.shape[:-1]]
    has_q = q is not None
    if has_q:
        q = _as_tensor(q, "q", c)
        if q.dim() < 1 or q.shape[-1] != n:
            raise ValueError(f"q must have shape (*batch, n={n}), got {tuple(q.shape)}")
        batch_shapes.append(q.shape[:-1])
    else:
        q = c.new_zeros(n)
    try:
        batch_shape = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError as e:
        raise ValueError(f"LP data batch shapes do not broadcast: {[tuple(s) for s in batch_shapes]}") from e
    B = math.prod(batch_shape)

    def vec(t: Tensor) -> Tensor:
        return t.expand(*batch_shape, t.shape[-1]).reshape(B, t.shape[-1])

    present = [M for M in mats if M is not None]
    if sparse:
        parts = [M if M.layout != torch.strided else M.reshape(M.shape[-2], n).to_sparse() for M in present]
        if any(M.layout == torch.strided and M.dim() > 2 for M in present):
            raise ValueError("a sparse and a batched dense constraint matrix cannot be mixed")
        K = _stack_sparse(parts, n) if parts else torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.int64), c.new_zeros(0), (0, n))
        op = LinOp(K)
    else:
        if present:
            kb = torch.broadcast_shapes(*[M.shape[:-2] for M in present])
            full = [M.expand(*kb, *M.shape[-2:]) for M in present]
            K = torch.cat(full, dim=-2)
        else:
            K = c.new_zeros(0, n)
            kb = torch.Size()
        if math.prod(kb) == 1:
            K = K.reshape(1, K.shape[-2], n)
        else:
            K = K.expand(*batch_shape, *K.shape[-2:]).reshape(B, K.shape[-2], n)
        op = LinOp(K)
    rhs = vec(torch.cat(_broadcast_vecs(vecs), dim=-1))
    if (lower > upper).any():
        raise ValueError("bounds have lower > upper for some variable")
    return LPData(c=vec(c), q=vec(q), rhs=rhs, lower=vec(lower), upper=vec(upper), K=op, n_eq=n_eq,
                  batch_shape=torch.Size(batch_shape), has_q=has_q)


def _broadcast_vecs(vecs: list[Tensor]) -> list[Tensor]:
    shapes = [v.shape[:-1] for v in vecs]
    bs = torch.broadcast_shapes(*shapes)
    return [v.expand(*bs, v.shape[-1]) for v in vecs]

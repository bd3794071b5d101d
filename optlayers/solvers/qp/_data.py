"""Validation and flat batching of QP data shared by the QP solver and the QP layer."""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["QPData", "prepare_qp"]


@dataclasses.dataclass
class QPData:
    """QP data with one flat batch dimension (``B`` or ``1`` for shared data).

    Attributes:
        Q, p, A, b, G, h: ``(B|1, n, n)``, ``(B|1, n)``, ``(B|1, p, n)``, ``(B|1, p)``,
            ``(B|1, m, n)``, ``(B|1, m)``.
        batch_shape: The broadcast batch shape of the inputs.
        B: ``prod(batch_shape)`` (1 when unbatched).
    """

    Q: torch.Tensor
    p: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    batch_shape: torch.Size
    B: int

    @property
    def n(self) -> int:
        return self.p.shape[-1]

    @property
    def n_eq(self) -> int:
        return self.b.shape[-1]

    @property
    def n_ineq(self) -> int:
        return self.h.shape[-1]


def _check(name: str, t: torch.Tensor, core: int, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < core:
        raise ValueError(f"{name} must have at least {core} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} has dtype/device {t.dtype}/{t.device} but Q has {like.dtype}/{like.device}")


def prepare_qp(Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None, h: torch.Tensor | None,
               A: torch.Tensor | None, b: torch.Tensor | None) -> QPData:
    """Validate shapes, fill absent constraints with empty tensors and flatten the batch.

    Raises:
        ValueError: On inconsistent shapes or a constraint matrix given without its vector.
        TypeError: On non-tensor, non-floating or mixed dtype/device inputs.
    """
    _check("Q", Q, 2, Q)
    _check("p", p, 1, Q)
    n = Q.shape[-1]
    if Q.shape[-2] != n or p.shape[-1] != n:
        raise ValueError(f"Q must be (..., n, n) and p (..., n); got {tuple(Q.shape)} and {tuple(p.shape)}")
    if (G is None) != (h is None):
        raise ValueError("G and h must be given together")
    if (A is None) != (b is None):
        raise ValueError("A and b must be given together")
    if G is None:
        G = Q.new_zeros(0, n)
        h = Q.new_zeros(0)
    if A is None:
        A = Q.new_zeros(0, n)
        b = Q.new_zeros(0)
    assert h is not None and b is not None
    _check("G", G, 2, Q)
    _check("h", h, 1, Q)
    _check("A", A, 2, Q)
    _check("b", b, 1, Q)
    if G.shape[-1] != n or h.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must be (..., m, n) and h (..., m) with n={n}; got {tuple(G.shape)} and {tuple(h.shape)}")
    if A.shape[-1] != n or b.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (..., p, n) and b (..., p) with n={n}; got {tuple(A.shape)} and {tuple(b.shape)}")
    try:
        batch_shape = torch.broadcast_shapes(Q.shape[:-2], p.shape[:-1], G.shape[:-2], h.shape[:-1],
                                             A.shape[:-2], b.shape[:-1])
    except RuntimeError as e:
        raise ValueError(f"QP data batch shapes do not broadcast: Q {tuple(Q.shape)}, p {tuple(p.shape)}, "
                         f"G {tuple(G.shape)}, h {tuple(h.shape)}, A {tuple(A.shape)}, b {tuple(b.shape)}") from e
    B = math.prod(batch_shape)

    def flat(t: torch.Tensor, core: int) -> torch.Tensor:
        tb = t.shape[: t.dim() - core]
        cs = t.shape[t.dim() - core:]
        if math.prod(tb) == 1:
            return t.reshape((1,) + cs)
        return t.expand(batch_shape + cs).reshape((B,) + cs)

    return QPData(Q=flat(Q, 2), p=flat(p, 1), A=flat(A, 2), b=flat(b, 1), G=flat(G, 2), h=flat(h, 1),
                  batch_shape=torch.Size(batch_shape), B=B)

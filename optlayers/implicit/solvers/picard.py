"""Picard (damped fixed-point) iteration for batched fixed-point problems ``z = T(z)``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, check_output, masked

__all__ = ["Picard"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Picard(IterativeSolver):
    r"""Damped Picard (Krasnosel'skii–Mann) iteration for a batch of fixed-point problems.

    Each element iterates

    .. math:: z_{k+1} = (1 - d)\, z_k + d\, T(z_k)

    with damping ``d ∈ (0, 1]``, which converges linearly when ``T`` is a contraction
    (``d = 1``) or, for ``d < 1``, when ``T`` is nonexpansive. One evaluation of ``T`` per
    iteration; the returned solution is the last iterate at which the residual was measured.

    Residual: ``‖T(z) - z‖₂``; converged when it is ``<= atol + rtol · ‖T(z0) - z0‖₂``.

    Attributes:
        damping: ``d`` (default 1.0, plain fixed-point iteration).
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 1000).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``.

    Example:
        >>> T = lambda z: 0.5 * torch.cos(z)
        >>> res = Picard().run_fixed_point(T, torch.zeros(2, 3, dtype=torch.float64))
        >>> bool(res.converged.all())
        True

    References:
        V. Berinde, *Iterative Approximation of Fixed Points*, Springer, 2007.
    """

    damping: float = 1.0
    max_iter: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("damping", float, low=0.0, strict=True, upper=1.0)

    def run_fixed_point(self, T: Fn, z0: torch.Tensor, *,
                        callback: Callback | None = None) -> Result:
        """Find ``z = T(z)`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        z = check_iterate(z0)
        r = check_output(T(z), tuple(z.shape), "T") - z
        tr = self._tracker(torch.linalg.vector_norm(r, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1))
        for _ in tr:
            z_new = z + self.damping * r
            r_new = T(z_new) - z_new
            take = tr.advance(torch.linalg.vector_norm(r_new, dim=-1),
                              nonfinite=~torch.isfinite(z_new).all(-1))
            z, r = masked(take, z_new, z), masked(take, r_new, r)
        return tr.finish(z)

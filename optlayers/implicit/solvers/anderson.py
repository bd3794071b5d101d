"""Anderson acceleration (type II) for batched fixed-point problems ``z = T(z)``."""

from __future__ import annotations

import dataclasses

import torch

from ..._result import Result
from ._base import Callback, Fn, IterativeSolver, check_iterate, check_output, masked
from ._steps import solve_or_pinv

__all__ = ["Anderson"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(IterativeSolver):
    r"""Type-II Anderson acceleration of the fixed-point iteration ``z = T(z)``, batched.

    With residuals ``f_k = T(z_k) - z_k`` and the last ``m_k = min(k, memory)`` differences
    ``ΔZ = [z_{i+1} - z_i]``, ``ΔF = [f_{i+1} - f_i]`` (``(n, m_k)`` per element), each
    element solves the small regularised least-squares problem

    .. math:: γ = \arg\min_γ ‖f_k - ΔF\,γ‖² + λ‖γ‖²,
              \quad (ΔF^\top ΔF + λ I)\,γ = ΔF^\top f_k,

    (batched ``m_k × m_k`` normal equations, ``λ = (ridge + 10ε)·tr(ΔFᵀΔF)/m_k``) and steps

    .. math:: z_{k+1} = z_k + β f_k - (ΔZ + β ΔF)\,γ

    with mixing ``β``. Safeguard (``safeguard=True``): where the accelerated point has a larger
    residual than ``z_k`` (or a non-finite one), the Picard step ``z_k + β f_k`` is taken
    instead (one more evaluation of ``T``, only when some element needs it, or always with
    ``check_every=None``).

    Residual: ``‖T(z) - z‖₂``; converged when it is ``<= atol + rtol · ‖T(z0) - z0‖₂``.

    Attributes:
        memory: History length ``m`` (default 5).
        mixing: ``β ∈ (0, 1]`` (default 1.0).
        ridge: Relative Tikhonov regularisation of the normal equations (default 1e-10).
        safeguard: Fall back to a Picard step where acceleration increases the residual.
        rtol, atol: Tolerances (``None``: 1e-10/1e-12 in float64, 1e-5/1e-7 in float32).
        max_iter: Iteration limit (default 500).
        check_every: Host-sync period of the stopping test; ``None`` runs exactly ``max_iter``.

    Example:
        >>> T = lambda z: 0.5 * torch.cos(z)
        >>> res = Anderson(memory=3).run_fixed_point(T, torch.zeros(2, 3, dtype=torch.float64))
        >>> bool(res.converged.all())
        True

    References:
        H. F. Walker & P. Ni, "Anderson acceleration for fixed-point iterations",
        SIAM J. Numer. Anal. 49(4), 2011.
    """

    memory: int = 5
    mixing: float = 1.0
    ridge: float = 1e-10
    safeguard: bool = True
    max_iter: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check("memory", int, low=1)
        self._check("mixing", float, low=0.0, strict=True, upper=1.0)
        self._check("ridge", float, low=0.0)
        self._check("safeguard", bool)

    def _accelerate(self, z: torch.Tensor, f: torch.Tensor, zs: list[torch.Tensor],
                    fs: list[torch.Tensor], sync: bool) -> torch.Tensor:
        dZ = torch.stack([b - a for a, b in zip(zs[:-1], zs[1:], strict=True)], dim=-1)  # (B, n, m)
        dF = torch.stack([b - a for a, b in zip(fs[:-1], fs[1:], strict=True)], dim=-1)
        m = dF.shape[-1]
        G = dF.transpose(-1, -2) @ dF
        eps = torch.finfo(z.dtype).eps
        trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
        lam = (self.ridge + 10 * eps) * trace / m + torch.finfo(z.dtype).tiny
        eye = torch.eye(m, dtype=z.dtype, device=z.device)
        gamma = solve_or_pinv(G + lam[:, None, None] * eye, (dF.transpose(-1, -2) @ f.unsqueeze(-1)).squeeze(-1), sync)
        gamma = torch.nan_to_num(gamma)
        return z + self.mixing * f - ((dZ + self.mixing * dF) @ gamma.unsqueeze(-1)).squeeze(-1)

    def run_fixed_point(self, T: Fn, z0: torch.Tensor, *,
                        callback: Callback | None = None) -> Result:
        """Find ``z = T(z)`` from ``z0`` (B, n); returns a flat :class:`Result`."""
        z = check_iterate(z0)
        f = check_output(T(z), tuple(z.shape), "T") - z
        tr = self._tracker(torch.linalg.vector_norm(f, dim=-1), z.dtype, callback,
                           nonfinite=~torch.isfinite(z).all(-1))
        zs, fs = [z], [f]
        for _ in tr:
            picard = len(zs) == 1
            z_new = z + self.mixing * f if picard else self._accelerate(z, f, zs, fs, tr.sync)
            f_new = T(z_new) - z_new
            res_new = torch.linalg.vector_norm(f_new, dim=-1)
            if self.safeguard and not picard:
                worse = tr.active & ~(res_new <= tr.residual)
                if not tr.sync or bool(worse.any()):
                    z_p = z + self.mixing * f
                    f_p = T(z_p) - z_p
                    z_new, f_new = masked(worse, z_p, z_new), masked(worse, f_p, f_new)
                    res_new = torch.linalg.vector_norm(f_new, dim=-1)
            take = tr.advance(res_new, nonfinite=~torch.isfinite(z_new).all(-1))
            z, f = masked(take, z_new, z), masked(take, f_new, f)
            zs, fs = (zs + [z])[-self.memory - 1:], (fs + [f])[-self.memory - 1:]
        return tr.finish(z)

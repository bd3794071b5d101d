"""Stabilized kernel-domain soft-min for stored costs: two matrix-vector products per iteration.

For a stored cost ``C (B, n, m)`` and *reference potentials* ``u (B, n)``, ``w (B, m)`` (finite),
keep the stabilized kernel

.. math:: \\tilde K_{ij} = \\exp\\big((u_i + w_j - C_{ij})/\\varepsilon\\big).

Then, exactly,

.. math::
    \\operatorname{softmin}_\\varepsilon(C - h)_i
      = u_i - \\varepsilon\\Big(\\log \\sum_j \\tilde K_{ij}\\, e^{s_j - \\bar s} + \\bar s\\Big),
    \\qquad s_j = (h_j - w_j)/\\varepsilon,\\ \\bar s = \\max_j s_j ,

and the same with ``K̃ᵀ`` over ``i``. Each soft-min is then one (batched) matrix-vector
product instead of an ``exp`` of every entry: the log-domain iteration of Schmitzer's
"absorption" scheme (Schmitzer 2019, *Stabilized sparse scaling algorithms for entropy
regularized transport problems*), with the potentials absorbed into ``K̃`` whenever the
product is no longer trustworthy.

Why it is exact to working precision: an entry of ``K̃`` that underflowed (``< tiny``) is
dropped, and ``e^{s_j − s̄} ≤ 1``, so the dropped part of a row's sum is below ``m · tiny``
(and the ``e^{s − s̄}`` that underflow drop less than ``max K̃ · n · tiny``). Every result row is
accepted only if its retained sum ``r_i`` exceeds that bound by a factor ``e^{margin}`` (36 in
float64, 17 in float32, i.e. below the unit roundoff); otherwise the call returns ``None``, the
caller computes that soft-min exactly (through the kernel dispatch) and the kernel is rebuilt
from the new potentials. Overflow is checked the same way. The iteration is therefore the
log-domain Sinkhorn iteration, evaluated differently.

Used by :func:`~optlayers.solvers.ot._iterations.solve_potentials` for stored costs (a
:class:`~optlayers.solvers.ot.CostMatrix` or a non-online point cloud) outside autograd, when no
kernel backend is forced (``OPTLAYERS_KERNELS`` / ``backend=`` force the dispatched soft-min).
"""

from __future__ import annotations

import math

import torch

__all__ = ["StabilizedKernel", "MAX_ENTRIES"]

#: Largest ``B·n·m`` for which the solver keeps a stabilized kernel beside the stored cost.
MAX_ENTRIES = 1 << 24


class StabilizedKernel:
    """``K̃ = exp((u ⊕ w − C)/ε)`` for one ε, rebuilt on demand (no autograd).

    Args:
        cost: ``(B, n, m)`` stored cost (detached, any strides).
        eps: ``(B,)`` temperatures of this stage.
    """

    def __init__(self, cost: torch.Tensor, eps: torch.Tensor) -> None:
        self.cost = cost
        self.eps = eps.detach()
        self.inv = (1.0 / self.eps)[:, None, None]
        B, n, m = cost.shape
        info = torch.finfo(cost.dtype)
        margin = 36.0 if cost.dtype == torch.float64 else 17.0
        self.log_floor = math.log(info.tiny) + math.log(float(n) * m + 1.0) + margin
        self.log_ceil = math.log(info.max) - math.log(float(max(n, m)) + 1.0) - 1.0
        self.K: torch.Tensor | None = None
        self.fresh = False  # rebuilt and not yet used successfully
        self.misses = 0  # failures right after a rebuild (NaN costs, extreme potentials)
        self.u = torch.zeros(B, n, dtype=cost.dtype, device=cost.device)
        self.w = torch.zeros(B, cost.shape[-1], dtype=cost.dtype, device=cost.device)

    @torch.no_grad()
    def rebuild(self, u: torch.Tensor, w: torch.Tensor) -> bool:
        """Absorb the potentials ``u (B, n)``, ``w (B, m)``; False if ``K̃`` would overflow.

        After two rebuilt kernels failed at once (e.g. a NaN cost in one problem of a batch), the
        kernel gives up for this stage and every soft-min is computed exactly.
        """
        if self.misses >= 2:
            self.K = None
            return False
        u = torch.where(torch.isfinite(u), u, torch.zeros_like(u))
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        K = self.K if self.K is not None else torch.empty_like(self.cost, memory_format=torch.contiguous_format)
        torch.sub(u[:, :, None] + w[:, None, :], self.cost, out=K)
        K.mul_(self.inv)
        if float(K.max()) > self.log_ceil:
            self.K = None
            return False
        K.exp_()
        self.K, self.u, self.w = K, u.clone(), w.clone()
        self.fresh = True
        return True

    @torch.no_grad()
    def softmin(self, h: torch.Tensor, axis: int, active: torch.Tensor | None = None) -> torch.Tensor | None:
        """``softmin_ε(C − h)`` over ``j`` (``axis=1``, ``h (B, m)``) or ``i`` (``axis=0``, ``h (B, n)``).

        Args:
            h: Input vector of the reduced side.
            axis: 1 or 0.
            active: ``(B,)`` bool, the problems whose result is used (others may be anything,
                e.g. NaN for a failed problem); None: all.

        Returns None when the result cannot be trusted (the caller computes it exactly).
        """
        out = self._softmin(h, axis, active)
        if out is None and self.fresh:
            self.misses += 1
        self.fresh = self.fresh and out is None
        return out

    def _softmin(self, h: torch.Tensor, axis: int, active: torch.Tensor | None) -> torch.Tensor | None:
        K = self.K
        if K is None:
            return None
        ref_in, ref_out = (self.w, self.u) if axis == 1 else (self.u, self.w)
        s = (h - ref_in) * self.inv[:, :, 0]
        smax = s.amax(-1, keepdim=True)
        fin = torch.isfinite(smax)
        if active is not None:
            fin = fin | ~active[:, None]
            smax = torch.where(active[:, None], smax, torch.zeros_like(smax))
        if not bool(fin.all()):
            return None
        s.sub_(smax).exp_()
        mat = K if axis == 1 else K.transpose(-1, -2)
        r = torch.bmm(mat, s[:, :, None])[:, :, 0]
        logr = r.log_()
        ok = (logr >= self.log_floor) & (logr <= self.log_ceil)
        if active is not None:
            ok = ok | ~active[:, None]
        if not bool(ok.all()):
            return None
        return ref_out - self.eps[:, None] * (logr + smax)

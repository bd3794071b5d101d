"""Exact optimal transport: 1-D by sorting, sliced and max-sliced Wasserstein, and EMD.

* :func:`wasserstein_1d` — ``W_p`` between 1-D measures through their quantile functions
  (sorting; unequal weights by quantile interpolation), batched, differentiable in values and
  weights:

  .. math:: W_p^p(\\mu, \\nu) = \\int_0^1 |F_\\mu^{-1}(q) - F_\\nu^{-1}(q)|^p \\, dq .

* :func:`sliced_wasserstein` / :func:`max_sliced_wasserstein` — the mean (resp. max) over
  random directions ``θ`` of ``W_p^p`` of the projected clouds; all projections in one GEMM.
* :func:`emd` — exact discrete OT by a CPU network simplex (POT's ``ot.emd`` when installed,
  else SciPy's HiGHS linear program), with potential-based gradients:
  ``∂/∂C = P``, ``∂/∂a = f``, ``∂/∂b = g`` (exact wherever the optimal basis is unique).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..._result import Result, Status, raise_if_failed, register_aux
from .geometry import Geometry, as_geometry

__all__ = ["wasserstein_1d", "sliced_wasserstein", "max_sliced_wasserstein", "emd", "EMDAux"]


def _root_p(wpp: torch.Tensor, p: float) -> torch.Tensor:
    """``wpp^(1/p)`` with a zero gradient at 0 (no NaN for identical measures)."""
    pos = wpp > 0
    safe = torch.where(pos, wpp, torch.ones_like(wpp))
    return torch.where(pos, safe.pow(1.0 / p), torch.zeros_like(wpp))


def _normalized(w: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    if w is None:
        return torch.full_like(values, 1.0 / values.shape[-1])
    w = torch.broadcast_to(w.to(values.dtype), values.shape)
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def _wasserstein_1d_pp(u: torch.Tensor, v: torch.Tensor, uw: torch.Tensor | None,
                       vw: torch.Tensor | None, p: float) -> torch.Tensor:
    """``W_p^p`` over the last axis (batched)."""
    batch = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
    u = torch.broadcast_to(u, (*batch, u.shape[-1]))
    v = torch.broadcast_to(v, (*batch, v.shape[-1]))
    uw_ = _normalized(uw, u)
    vw_ = _normalized(vw, v)
    us, ui = torch.sort(u, dim=-1)
    vs, vi = torch.sort(v, dim=-1)
    cu = torch.cumsum(torch.gather(uw_, -1, ui), -1)
    cv = torch.cumsum(torch.gather(vw_, -1, vi), -1)
    qs = torch.sort(torch.cat([cu, cv], -1), dim=-1).values
    q_prev = torch.cat([torch.zeros_like(qs[..., :1]), qs[..., :-1]], -1)
    delta = qs - q_prev
    iu = torch.searchsorted(cu.detach().contiguous(), qs.detach().contiguous()).clamp_max(u.shape[-1] - 1)
    iv = torch.searchsorted(cv.detach().contiguous(), qs.detach().contiguous()).clamp_max(v.shape[-1] - 1)
    du = torch.gather(us, -1, iu) - torch.gather(vs, -1, iv)
    absd = du.abs()
    if p == 1:
        term = absd
    else:
        pos = absd > 0
        term = torch.where(pos, torch.where(pos, absd, torch.ones_like(absd)).pow(p), torch.zeros_like(absd))
    return (delta * term).sum(-1)


def wasserstein_1d(u_values: torch.Tensor, v_values: torch.Tensor, u_weights: torch.Tensor | None = None,
                   v_weights: torch.Tensor | None = None, *, p: float = 1) -> torch.Tensor:
    """Exact ``W_p`` (not ``W_p^p``) between 1-D discrete measures, over the last axis.

    Args:
        u_values: ``(*batch, n)`` support of the first measure.
        v_values: ``(*batch, m)`` support of the second.
        u_weights: ``(*batch, n)`` nonnegative weights (normalized here) or None (uniform).
        v_weights: ``(*batch, m)`` or None.
        p: Order ``p ≥ 1``.

    Returns:
        ``(*batch,)``. Matches ``scipy.stats.wasserstein_distance`` for ``p = 1``.

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import wasserstein_1d
        >>> float(wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])))
        2.0
    """
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p}")
    return _root_p(_wasserstein_1d_pp(u_values, v_values, u_weights, v_weights, p), p)


def _directions(d: int, n_projections: int, dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None) -> torch.Tensor:
    theta = torch.randn(d, n_projections, dtype=dtype, device=device, generator=generator)
    return theta / theta.norm(dim=0, keepdim=True)


def _projected_pp(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                  theta: torch.Tensor, p: float) -> torch.Tensor:
    px = (x @ theta).transpose(-1, -2)  # (*batch, L, n)
    py = (y @ theta).transpose(-1, -2)
    aw = None if a is None else a.unsqueeze(-2)
    bw = None if b is None else b.unsqueeze(-2)
    return _wasserstein_1d_pp(px, py, aw, bw, p)  # (*batch, L)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                       b: torch.Tensor | None = None, *, n_projections: int = 50, p: float = 2,
                       projections: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sliced Wasserstein distance ``(E_θ W_p^p(θ#μ, θ#ν))^{1/p}`` by Monte Carlo.

    With directions ``θ_1, ..., θ_L`` on the unit sphere (random, or ``projections``) and
    ``θ#μ`` the 1-D measure of the projections ``⟨θ, x_i⟩`` with weights ``a_i``:

    .. math::
        \\mathrm{SW}_p(\\mu, \\nu) = \\Big(\\frac1L \\sum_{l=1}^L
            W_p^p(\\theta_l \\# \\mu, \\theta_l \\# \\nu)\\Big)^{1/p},

    each 1-D term exact by sorting (:func:`wasserstein_1d`). Differentiable in ``x``, ``y``,
    ``a`` and ``b``.

    Args:
        x: ``(*batch, n, d)``; y: ``(*batch, m, d)``.
        a, b: Weights ``(*batch, n)``/``(*batch, m)`` or None (uniform).
        n_projections: Number of random directions (one GEMM for all).
        p: Order.
        projections: ``(d, L)`` directions to use instead of random ones (unit columns).
        generator: Random generator for the directions.

    Returns:
        ``(*batch,)``.

    Example:
        A translation by ``t`` projects to a shift by ``⟨θ, t⟩`` on every axis, so with the
        coordinate axes as directions ``SW_2² = (t_1² + t_2²) / 2``:

        >>> import torch
        >>> from optlayers.solvers.ot import sliced_wasserstein
        >>> x = torch.rand(50, 2, dtype=torch.float64)
        >>> y = x + torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> sw = sliced_wasserstein(x, y, projections=torch.eye(2, dtype=torch.float64))
        >>> round(float(sw) ** 2, 6)
        12.5
        >>> g = torch.Generator().manual_seed(0)       # random directions, reproducible
        >>> sliced_wasserstein(x, y, n_projections=100, generator=g).shape
        torch.Size([])
    """
    theta = projections if projections is not None else _directions(
        x.shape[-1], n_projections, x.dtype, x.device, generator)
    return _root_p(_projected_pp(x, y, a, b, theta.to(x.dtype), p).mean(-1), p)


def max_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                           b: torch.Tensor | None = None, *, n_projections: int = 50, p: float = 2,
                           projections: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Max-sliced Wasserstein ``max_θ W_p(θ#μ, θ#ν)`` over the given or random directions.

    .. math::
        \\max_{l = 1..L} W_p(\\theta_l \\# \\mu, \\theta_l \\# \\nu)

    Same arguments as :func:`sliced_wasserstein`; the gradient flows through the maximizing
    direction's ``W_p``.

    Returns:
        ``(*batch,)``.

    Example:
        Of the directions ``e_1``, ``e_2`` and ``(0.6, 0.8)``, the last is aligned with the
        translation ``t = (3, 4)`` and gives ``W_2 = ‖t‖ = 5``:

        >>> import torch
        >>> from optlayers.solvers.ot import max_sliced_wasserstein
        >>> x = torch.rand(50, 2, dtype=torch.float64)
        >>> y = x + torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> theta = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]], dtype=torch.float64)
        >>> round(float(max_sliced_wasserstein(x, y, projections=theta)), 6)
        5.0
    """
    theta = projections if projections is not None else _directions(
        x.shape[-1], n_projections, x.dtype, x.device, generator)
    return _root_p(_projected_pp(x, y, a, b, theta.to(x.dtype), p).amax(-1), p)


# ----------------------------------------------------------------------------------------------
# EMD (network simplex)
# ----------------------------------------------------------------------------------------------


@register_aux
@dataclasses.dataclass(frozen=True)
class EMDAux:
    """Extras of :func:`emd`: the dense optimal ``plan`` and the ``value`` ``⟨C, P⟩``."""

    plan: torch.Tensor
    value: torch.Tensor


def _emd_numpy(a: np.ndarray, b: np.ndarray, C: np.ndarray,
               max_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    try:
        import ot  # POT's network simplex

        G, log = ot.emd(a, b, C, numItermax=max_iter, log=True)
        ok = log.get("warning") is None and log.get("result_code", 1) == 1
        return np.asarray(G), np.asarray(log["u"]), np.asarray(log["v"]), bool(ok)
    except ImportError:  # pragma: no cover - exercised only without POT
        from scipy.optimize import linprog

        n, m = C.shape
        A_eq = np.zeros((n + m, n * m))
        for i in range(n):
            A_eq[i, i * m:(i + 1) * m] = 1.0
        for j in range(m):
            A_eq[n + j, j::m] = 1.0
        res = linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
        if res.status != 0:
            return np.zeros((n, m)), np.zeros(n), np.zeros(m), False
        duals = res.eqlin.marginals
        return res.x.reshape(n, m), duals[:n], duals[n:], True


def emd(a: torch.Tensor | None, b: torch.Tensor | None, geometry: Geometry | torch.Tensor, *,
        max_iter: int = 1_000_000, throw: bool = True) -> Result[EMDAux]:
    """Exact (unregularized) OT by a CPU network simplex, with potential-based gradients.

    The value ``⟨C, P⟩`` is returned as a differentiable expression whose gradients are the
    optimal plan (for ``C``, and through it for points) and the dual potentials (for ``a``, ``b``):

    .. math:: \\partial_C W = P^\\star, \\quad \\partial_a W = f^\\star, \\quad \\partial_b W = g^\\star .

    Args:
        a: ``(*batch, n)`` weights or None (uniform); b: ``(*batch, m)`` or None. Masses are
            normalized to ``sum(a)``.
        geometry: A cost tensor or a :class:`Geometry` (materialized: for small problems).
        max_iter: Network simplex iteration limit.
        throw: Raise :class:`ConvergenceError` if the simplex stops early.

    Returns:
        :class:`Result` with ``solution = (f, g)`` (normalized ``⟨a, f⟩ = ⟨b, g⟩``) and ``aux`` an
        :class:`EMDAux` (``plan``, ``value``).

    Example:
        >>> import torch
        >>> from optlayers.solvers.ot import emd
        >>> C = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> float(emd(None, None, C).aux.value)
        0.0
    """
    geom = as_geometry(geometry)
    C = geom.to_dense()
    batch, n, m = geom.batch_shape, geom.n, geom.m
    B = geom.B
    dtype, device = C.dtype, C.device
    aw = torch.full((*batch, n), 1.0 / n, dtype=dtype, device=device) if a is None else \
        torch.broadcast_to(a.to(dtype), (*batch, n))
    bw = torch.full((*batch, m), 1.0 / m, dtype=dtype, device=device) if b is None else \
        torch.broadcast_to(b.to(dtype), (*batch, m))
    Cn = C.detach().reshape(B, n, m).cpu().double().numpy()
    an = aw.detach().reshape(B, n).cpu().double().numpy()
    bn = bw.detach().reshape(B, m).cpu().double().numpy()
    plans, fs, gs, oks = [], [], [], []
    for k in range(B):
        ak = an[k]
        bk = bn[k] * (ak.sum() / max(bn[k].sum(), 1e-300))
        G, u, v, ok = _emd_numpy(np.ascontiguousarray(ak), np.ascontiguousarray(bk),
                                 np.ascontiguousarray(Cn[k]), max_iter)
        c = (bk @ v - ak @ u) / max(ak.sum() + bk.sum(), 1e-300)
        plans.append(G)
        fs.append(u + c)
        gs.append(v - c)
        oks.append(ok)
    P = torch.as_tensor(np.stack(plans), dtype=dtype, device=device).reshape(*batch, n, m)
    f = torch.as_tensor(np.stack(fs), dtype=dtype, device=device).reshape(*batch, n)
    g = torch.as_tensor(np.stack(gs), dtype=dtype, device=device).reshape(*batch, m)
    value = (P * C).sum((-1, -2)) + (f * (aw - aw.detach())).sum(-1) + (g * (bw - bw.detach())).sum(-1)
    conv = torch.as_tensor(oks, dtype=torch.bool, device=device).reshape(batch)
    status = torch.where(conv, torch.zeros((), dtype=torch.int64, device=device),
                         torch.full((), int(Status.MAX_ITER), dtype=torch.int64, device=device))
    res: Result[EMDAux] = Result((f, g), conv, torch.zeros(batch, dtype=torch.int64, device=device),
                                 torch.zeros(batch, dtype=dtype, device=device), status,
                                 EMDAux(plan=P, value=value))
    return raise_if_failed("emd", res, throw, max_iter=max_iter)




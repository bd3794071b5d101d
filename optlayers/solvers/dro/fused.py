r"""Training fast path of the DRO losses: the robust value and its Danskin gradient from one
compiled (Numba) call per row, with no per-op tensor overhead.

:func:`fused_robust_value` computes, for CPU losses and the specs below, the same quantity as
``robust_weights(losses, spec).aux.value``,

.. math:: R(\ell) = \langle p^\star, \ell\rangle - \lambda D(p^\star), \qquad
          \partial R/\partial\ell = p^\star \quad\text{(Danskin)},

by the same algorithms (the fused row solvers of :mod:`optlayers.kernels.dro_fused` transcribe
the PyTorch solvers step by step; the tests compare the two to the solvers' tolerance): the
detached float32 or float64 losses are read in place (no dtype round trip: the compiled batch
drivers load each row into float64 and write the weights and values back in the losses'
dtype), the whole inner problem (selection, sort, scan, PAV or 1-D safeguarded
Newton–bisection, then the weights) runs in one compiled call per batch, and the value carries
the Danskin gradient ``grad * p``. At a training step's sizes the PyTorch solvers spend most of
their time in the per-op overhead of tens of small tensor ops; here a step costs one compiled
call and one or two tensor ops.

- **One vector of losses** (the training step; :class:`FusedRunner`): the kernel reads the
  losses and writes the weights by address (:mod:`optlayers.kernels.dro_fused_row`; no NumPy
  view, no output array), and the value is one ``dot`` node whose output is overwritten with
  the penalized value (:func:`_danskin_dot`). Inside a training step, where the model's forward
  pass has just evicted the caches, each Python-level conversion or extra tensor op costs
  20–40 µs, several times the kernel's own per-op share.
- **A batch of rows:** NumPy views of the losses and the outputs, and a small autograd function.
- **Sorting:** spectral rows are sorted inside the compiled call, by an LSD radix sort of
  order-preserving 32-bit keys (float64 rows: of their float32-rounded values, then one exact
  insertion pass over equal keys). Loss dtypes other than float32 and float64 take a float64 copy.
- **Transforms:** under ``torch.func`` (``grad``, ``jacrev``, ``jacfwd``, ``vmap``) or a forward-mode AD
  level the fast path declines (it reads raw memory and carries only the reverse-mode gradient);
  :func:`~optlayers.solvers.dro.robust_weights` then gives the same value with full support.

Covered: ``CVaR`` (unsmoothed), ``TotalVariation``, ``ChiSquareBall`` (no penalty),
``ChiSquarePenalty``, ``KLBall``, ``KLPenalty``, ``CressieRead`` (``k != 2``), ``Spectral``
(with a penalty) and ``HolisticRobust``. Anything else — other devices, a forced non-Numba
backend, non-finite losses, a root-find that did not converge — returns ``None`` and the caller
uses :func:`~optlayers.solvers.dro.robust_weights`, which handles and reports those cases.

Warm start: the root-find specs (KL ball, Cressie–Read, holistic) return their root (in the
solver's own variable); passing it back as ``warm`` on the next call starts the search there.
The stopping test does not change (``|f| <= tol`` on the feasible side), so the result agrees
with a cold start to the tolerance; successive training batches have close roots, so a warm
search typically needs 1–3 function evaluations instead of 5–10.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad

from ...kernels import ENV_VAR, Backend, backend_available, forced_backend
from ._specs import (
    ChiSquareBall,
    ChiSquarePenalty,
    CressieRead,
    CVaR,
    DROSpec,
    HolisticRobust,
    KLBall,
    KLPenalty,
    Spectral,
    TotalVariation,
)
from .cvar import cvar_k

__all__ = ["fused_supported", "fused_solve", "fused_robust_value", "DanskinValue", "FusedRunner"]

#: largest batch (number of rows) the fast path takes; bigger batches amortise the per-op
#: overhead of the batched PyTorch solvers
MAX_ROWS = 64


class DanskinValue(torch.autograd.Function):
    """``value`` as a function of ``losses`` with gradient ``grad[..., None] * p`` (``p`` fixed)."""

    @staticmethod
    def forward(ctx: Any, losses: Tensor, value: Tensor, p: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(p)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * p, None, None


def fused_supported(spec: DROSpec) -> bool:
    """Whether :func:`fused_solve` covers ``spec``."""
    if isinstance(spec, CVaR):
        return spec.smoothing == 0
    if isinstance(spec, ChiSquareBall):
        return spec.lam == 0
    if isinstance(spec, CressieRead):
        return spec.k != 2.0
    if isinstance(spec, Spectral):
        return spec.lam > 0
    return isinstance(spec, (TotalVariation, ChiSquarePenalty, KLBall, KLPenalty, HolisticRobust))


def _argmax_uniform(a: np.ndarray) -> np.ndarray:
    top = (a == a.max(1, keepdims=True)).astype(np.float64)
    return top / top.sum(1, keepdims=True)


def _value(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", p, a)


def fused_solve(a: np.ndarray, spec: DROSpec, *, tol: float, max_iter: int,
                warm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weights, robust value, root (NaN for closed forms) and convergence flags of every row of
    the finite, C-contiguous float64 ``(B, n)`` array ``a`` (Numba; see the module doc)."""
    from ...kernels import dro_fused as K

    B, n = a.shape
    if isinstance(spec, TotalVariation) and (spec.eps >= 1.0 or spec.eps <= 0.0):
        p = _argmax_uniform(a) if spec.eps >= 1.0 else np.full_like(a, 1.0 / n)
        return p, _value(p, a), np.full(B, np.nan), np.ones(B, dtype=np.bool_)
    if isinstance(spec, (CVaR, TotalVariation)):
        eps = spec.eps if isinstance(spec, TotalVariation) else 0.0
        alpha = spec.alpha if isinstance(spec, CVaR) else 1.0 - eps
        return K.fused_rows("cvar", a, (float(alpha), cvar_k(alpha, n), float(eps)), tol, max_iter, None)
    if isinstance(spec, ChiSquareBall):
        if spec.rho <= 0.0:
            p = np.full_like(a, 1.0 / n)
            return p, _value(p, a), np.full(B, np.nan), np.ones(B, dtype=np.bool_)
        return K.fused_rows("chi2_ball", a, (float(spec.rho),), tol, max_iter, None)
    if isinstance(spec, Spectral):
        w = spec.sigma.cached_weights(n, torch.float64, torch.device("cpu")).flip(0).numpy()
        return K.fused_rows("spectral", a, (w, float(spec.lam), spec.divergence == "kl"), tol, max_iter, None)
    if isinstance(spec, ChiSquarePenalty):
        return K.fused_rows("chi2_penalty", a, (float(spec.lam),), tol, max_iter, None)
    if isinstance(spec, KLPenalty):
        return K.fused_rows("kl_penalty", a, (float(spec.lam), -1.0 if spec.optimistic else 1.0), tol, max_iter, None)
    if isinstance(spec, KLBall):
        return K.fused_rows("kl_ball", a, (float(spec.rho),), tol, max_iter, warm)
    if isinstance(spec, CressieRead):
        if spec.rho is not None:
            return K.fused_rows("cr_ball", a, (float(spec.k), float(spec.rho)), tol, max_iter, warm)
        return K.fused_rows("cr_penalty", a, (float(spec.k), float(spec.lam)), tol, max_iter,  # type: ignore[arg-type]
                            warm)
    if isinstance(spec, HolisticRobust):
        return K.fused_rows("holistic", a, (float(spec.alpha), float(spec.r)), tol, max_iter, warm)
    raise TypeError(f"fused_solve does not cover {type(spec).__name__}")


def fused_available(losses: Tensor, backend: Backend | str | None) -> bool:
    """Whether the fast path may run: CPU losses, Numba installed, no backend other than Numba
    requested (by ``backend=`` or ``OPTLAYERS_KERNELS``), and no ``torch.func`` transform or
    forward-mode AD level active."""
    global _NUMBA_OK
    if losses.device.type != "cpu" or losses.dim() == 0 or losses.shape[-1] == 0 or _transformed():
        return False
    if backend is None and _NUMBA_OK and not os.environ.get(ENV_VAR):  # the common case, cheaply
        return True
    if backend is not None:
        if Backend.parse(backend) is not Backend.NUMBA:
            return False
    else:
        forced = forced_backend()
        if forced is not None and forced is not Backend.NUMBA:
            return False
    if not _NUMBA_OK:
        _NUMBA_OK = backend_available(Backend.NUMBA)
    return _NUMBA_OK


_NUMBA_OK: bool | None = None


def _make_plan(spec: DROSpec, n: int) -> tuple[Any, ...] | None:
    """How the fast path solves ``spec`` at size ``n``: ``None`` (not covered), ``("legacy",)``
    (the degenerate closed forms of :func:`fused_solve`), or the batch driver of
    :mod:`optlayers.kernels.dro_fused` and its parameters: ``("closed", which, p1, p2, p3)``,
    ``("spectral", lam, kl, w, logw)`` or ``("root", which, p1, p2)``."""
    from ...kernels.dro_fused import CLOSED_KINDS, ROOT_KINDS

    if not fused_supported(spec):
        return None
    if isinstance(spec, TotalVariation) and (spec.eps >= 1.0 or spec.eps <= 0.0):
        return ("legacy",)
    if isinstance(spec, (CVaR, TotalVariation)):
        eps = spec.eps if isinstance(spec, TotalVariation) else 0.0
        alpha = spec.alpha if isinstance(spec, CVaR) else 1.0 - eps
        return ("closed", CLOSED_KINDS["cvar"], float(alpha), float(cvar_k(alpha, n)), float(eps))
    if isinstance(spec, ChiSquareBall):
        if spec.rho <= 0.0:
            return ("legacy",)
        return ("closed", CLOSED_KINDS["chi2_ball"], float(spec.rho), 0.0, 0.0)
    if isinstance(spec, ChiSquarePenalty):
        return ("closed", CLOSED_KINDS["chi2_penalty"], float(spec.lam), 0.0, 0.0)
    if isinstance(spec, KLPenalty):
        return ("closed", CLOSED_KINDS["kl_penalty"], float(spec.lam), -1.0 if spec.optimistic else 1.0, 0.0)
    if isinstance(spec, Spectral):
        from ...kernels.dro_spectral_fused import log_weights

        w = spec.sigma.cached_weights(n, torch.float64, torch.device("cpu")).flip(0).numpy()
        w = np.ascontiguousarray(w, dtype=np.float64)
        kl = spec.divergence == "kl"
        return ("spectral", float(spec.lam), kl, w, log_weights(w) if kl else _NO_WEIGHTS)
    if isinstance(spec, KLBall):
        return ("root", ROOT_KINDS["kl_ball"], float(spec.rho), 0.0)
    if isinstance(spec, CressieRead):
        if spec.rho is not None:
            return ("root", ROOT_KINDS["cr_ball"], float(spec.k), float(spec.rho))
        return ("root", ROOT_KINDS["cr_penalty"], float(spec.k), float(spec.lam))  # type: ignore[arg-type]
    if isinstance(spec, HolisticRobust):
        return ("root", ROOT_KINDS["holistic"], float(spec.alpha), float(spec.r))
    return None


_PLANS: dict[tuple[int, int], tuple[DROSpec, tuple[Any, ...] | None]] = {}
_NO_WEIGHTS = np.empty(0)


def _plan(spec: DROSpec, n: int) -> tuple[Any, ...] | None:
    """:func:`_make_plan`, memoised per ``(spec object, n)`` (specs are frozen; the entry keeps
    the spec alive, so its ``id`` cannot be reused)."""
    key = (id(spec), n)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    plan = _make_plan(spec, n)
    if len(_PLANS) >= 256:
        _PLANS.clear()
    _PLANS[key] = (spec, plan)
    return plan


def _legacy(losses: Tensor, spec: DROSpec, tol: float, max_iter: int, B: int, n: int,
            state: dict[str, Any] | None) -> tuple[Tensor, Tensor] | None:
    """The float64 NumPy route through :func:`fused_solve` (degenerate cases, other dtypes)."""
    a = np.ascontiguousarray(losses.detach().reshape(B, n).to(torch.float64).numpy())
    s = float(a.sum())
    if not math.isfinite(s) and not np.isfinite(a).all():
        return None
    key = (tuple(losses.shape[:-1]), n)
    warm = None
    if state is not None and state.get("key") == key:
        warm = state.get("x")
    p, val, x, conv = fused_solve(a, spec, tol=tol, max_iter=max_iter, warm=warm)
    if not conv.all():
        if state is not None:
            state.clear()
        return None
    if state is not None:
        state["key"] = key
        state["x"] = x
    dt = losses.dtype
    p_t = torch.from_numpy(p).to(dt).reshape(losses.shape)
    v_t = torch.from_numpy(val).to(dt).reshape(losses.shape[:-1])
    return DanskinValue.apply(losses, v_t, p_t), p_t


_KERNELS: Any = None
_SPECTRAL: Any = None


def _spectral() -> Any:
    """:mod:`optlayers.kernels.dro_spectral_fused` (imported on first use)."""
    global _SPECTRAL
    if _SPECTRAL is None:
        from ...kernels import dro_spectral_fused

        _SPECTRAL = dro_spectral_fused
    return _SPECTRAL


def _kernels() -> Any:
    """:mod:`optlayers.kernels.dro_fused` (imported on first use: it compiles with Numba)."""
    global _KERNELS
    if _KERNELS is None:
        from ...kernels import dro_fused

        _KERNELS = dro_fused
    return _KERNELS


def fused_robust_value(losses: Tensor, spec: DROSpec, *, tol: float | None = None, max_iter: int = 100,
                       backend: Backend | str | None = None,
                       state: dict[str, Any] | None = None) -> tuple[Tensor, Tensor] | None:
    """``(value, p)``: the robust value (differentiable, Danskin) and the weights (no gradient) of
    ``losses`` (``(*batch, n)``), or ``None`` when the fast path does not apply (see the module
    doc; the caller then uses :func:`~optlayers.solvers.dro.robust_weights`).

    float32 and float64 losses are read in place (one NumPy view, no dtype conversion); the
    compiled batch driver solves each row in float64 and writes the weights and values in the
    losses' dtype into fresh arrays that become the returned tensors without a copy.

    ``state``: a dict kept by the caller between calls for the warm start (the root of the
    previous call, per batch shape); ``None`` disables it.
    """
    run = FusedRunner.create(spec, losses, tol=tol, max_iter=max_iter, backend=backend, state=state)
    if run is None:
        return None
    if run.legacy:
        return _legacy(losses, spec, run.tol, run.max_iter, run.B, run.n, state)
    out = run.solve(losses)
    if out is None:
        return None
    P, V, _ = out
    p_t = torch.from_numpy(P)
    v_t = torch.from_numpy(V).reshape(run.vshape)
    if not losses.requires_grad:
        return v_t, p_t
    if len(run.shape) == 1:
        # built-in ops instead of the Python autograd function (cheaper in a training step):
        # value d + (R - d) with d = <losses, p>, gradient grad * p; R - d is exact (Sterbenz)
        # whenever R and d are within a factor 2, and within an ulp of R otherwise
        d = torch.dot(losses, p_t)
        return d + (v_t - d.detach()), p_t
    return DanskinValue.apply(losses, v_t, p_t), p_t


def _transformed() -> bool:
    """Whether a ``torch.func`` transform or a forward-mode AD level is active. The fast path
    then declines: it reads the losses' raw memory (which wrapped tensors lack) and carries only
    the reverse-mode gradient; :func:`~optlayers.solvers.dro.robust_weights` handles both."""
    return bool(torch._C._are_functorch_transforms_active()) or getattr(forward_ad, "_current_level", -1) >= 0


_SCALAR_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def _danskin_dot(losses: Tensor, p: Tensor, value: float | None) -> Tensor:
    """``<losses, p>`` as one autograd node, whose gradient ``grad * p`` is the Danskin gradient,
    with its value replaced by ``value`` when given (a penalized spec: ``<p, l> - λ D(p)``).

    The dot product's backward saves its inputs, not its output, so overwriting the fresh 0-d
    output changes the value and not the gradient. It is written through its address: an
    in-place torch op, or a bias added by a second op, would be one more dispatched op, and in a
    training step (cold caches) each costs 20–40 µs (measured: ``dot`` + an address write ~10 µs
    over ``dot`` alone, ``F.linear`` with a bias ~45 µs)."""
    out = torch.dot(losses, p)
    if value is not None:
        ctype = _SCALAR_CTYPES.get(out.dtype)
        if ctype is None:  # e.g. a lower precision under autocast: the value by two more ops
            return out + (value - out.detach())
        ctype.from_address(out.data_ptr()).value = value
    return out


def _row_runner(run: FusedRunner) -> Callable[[Tensor], Tensor | None]:
    """The call of ``run`` for one contiguous row of losses, by address
    (:mod:`optlayers.kernels.dro_fused_row`): the weights go into a fresh tensor, the value comes
    back as a number, and no NumPy view or output array is made (see that module for why)."""
    from ...kernels.dro_fused_row import closed_row_at, root_row_at, spectral_row_at

    n, dtype, penalized, plan = run.n, run.dtype, run.penalized, run.plan
    f32 = dtype == torch.float32

    def finish(losses: Tensor, p: Tensor, value: float) -> Tensor:
        if not losses.requires_grad:
            return torch.scalar_tensor(value, dtype=dtype)
        return _danskin_dot(losses, p, value if penalized else None)

    if plan[0] == "closed":
        _, which, c1, c2, c3 = plan

        def closed(losses: Tensor) -> Tensor | None:
            p = torch.empty(n, dtype=dtype)
            ok, value, _ = closed_row_at(which, f32, losses.data_ptr(), p.data_ptr(), n, c1, c2, c3)
            return finish(losses, p, value) if ok else None

        return closed

    if plan[0] == "spectral":
        _, lam, kl, w, logw = plan

        def spectral(losses: Tensor) -> Tensor | None:
            p = torch.empty(n, dtype=dtype)
            ok, value, _ = spectral_row_at(f32, losses.data_ptr(), p.data_ptr(), n, w, logw, lam, kl)
            return finish(losses, p, value) if ok else None

        return spectral

    _, which, r1, r2 = plan
    state, tol, max_iter, key = run.state, run.tol, run.max_iter, ("row", n)

    def root(losses: Tensor) -> Tensor | None:
        x0 = state["x"] if state is not None and state.get("key") == key else math.nan
        p = torch.empty(n, dtype=dtype)
        status, value, _, x = root_row_at(which, f32, losses.data_ptr(), p.data_ptr(), n, r1, r2, tol, max_iter,
                                          x0)
        if status != 0:
            if status == 2 and state is not None:
                state.clear()
            return None
        if state is not None:
            state["key"] = key
            state["x"] = x
        return finish(losses, p, value)

    return root


def _env_forced() -> bool:
    """Whether ``OPTLAYERS_KERNELS`` is set (a dict lookup on POSIX, where ``os.environ.get``
    re-encodes the key on every call)."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        return bool(data.get(_ENV_KEY))
    return bool(os.environ.get(ENV_VAR))


_ENV_KEY = os.fsencode(ENV_VAR) if os.name == "posix" else ENV_VAR


class FusedRunner:
    """:func:`fused_robust_value` prepared once for a spec and a losses signature (shape, dtype,
    CPU), for the training step, where the checks and the plan lookup of a general call are a
    sizeable part of the time. For one contiguous vector of losses a call is one weights tensor,
    one compiled call by address and one ``dot`` (:func:`_row_runner`); for a batch of rows, NumPy
    views, one compiled call and a small autograd function.

    :meth:`create` returns ``None`` when the fast path cannot apply to that signature (then use
    :func:`~optlayers.solvers.dro.robust_weights`); a call returns ``None`` when it declines for
    that call (non-finite losses, a root-find that did not converge, a backend forced through
    ``OPTLAYERS_KERNELS``), exactly where :func:`fused_robust_value` would.

    Example:
        >>> import torch
        >>> from optlayers.solvers.dro import CVaR
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
        >>> run = FusedRunner.create(CVaR(0.5), losses, tol=None, max_iter=100, backend=None, state=None)
        >>> run.matches(losses)
        True
        >>> run(losses).backward()
        >>> losses.grad.tolist()
        [0.0, 0.0, 0.5, 0.5]
    """

    __slots__ = ("spec", "shape", "dtype", "n", "B", "tol", "max_iter", "backend", "state", "plan", "kernels",
                 "vshape", "legacy", "key", "penalized", "row")

    def __init__(self, spec: DROSpec, shape: torch.Size, dtype: torch.dtype, tol: float, max_iter: int,
                 backend: Backend | str | None, state: dict[str, Any] | None, plan: tuple[Any, ...]) -> None:
        self.spec, self.shape, self.dtype = spec, shape, dtype
        self.n = shape[-1]
        self.B = math.prod(shape[:-1])
        self.vshape = shape[:-1]
        self.key = (shape[:-1], self.n)
        self.tol, self.max_iter, self.backend, self.state, self.plan = tol, max_iter, backend, state, plan
        self.legacy = plan[0] == "legacy" or (dtype != torch.float32 and dtype != torch.float64)
        self.penalized = isinstance(spec, (ChiSquarePenalty, KLPenalty, Spectral)) or (
            isinstance(spec, CressieRead) and spec.rho is None)
        self.kernels = None if self.legacy else _kernels()
        self.row = None if self.legacy or len(shape) != 1 else _row_runner(self)  # one row, by address

    @classmethod
    def create(cls, spec: DROSpec, losses: Tensor, *, tol: float | None, max_iter: int,
               backend: Backend | str | None, state: dict[str, Any] | None) -> FusedRunner | None:
        """A runner for losses like ``losses``, or ``None`` where the fast path never applies."""
        shape = losses.shape
        if not shape or not shape[-1]:
            return None
        n = shape[-1]
        if not fused_available(losses, backend):
            return None
        plan = _plan(spec, n)
        if plan is None:
            return None
        B = losses.numel() // n
        if B > MAX_ROWS or B == 0:
            return None
        dt = losses.dtype
        if tol is None:
            tol_ = 1e-12 if dt == torch.float64 else 1e-7
        elif not (tol > 0 and math.isfinite(tol)):
            return None  # robust_weights raises the error
        else:
            tol_ = float(tol)
        return cls(spec, shape, dt, tol_, int(max_iter), backend, state, plan)

    def matches(self, losses: Tensor) -> bool:
        """Whether ``losses`` has this runner's signature."""
        return losses.shape == self.shape and losses.dtype == self.dtype and losses.is_cpu

    def __call__(self, losses: Tensor) -> Tensor | None:
        """The robust value of ``losses`` (signature checked by :meth:`matches`) with the Danskin
        gradient, or ``None`` (see the class doc)."""
        if self.backend is None and _env_forced() and not fused_available(losses, None):
            return None
        if _transformed():
            return None
        row = self.row
        if row is not None and losses.is_contiguous():
            return row(losses)
        if self.legacy:
            out = _legacy(losses, self.spec, self.tol, self.max_iter, self.B, self.n, self.state)
            return None if out is None else out[0]
        res = self.solve(losses)
        if res is None:
            return None
        P, V, D = res
        p_t = torch.from_numpy(P)
        if not losses.requires_grad:
            return torch.from_numpy(V).reshape(self.vshape)
        if len(self.shape) == 1:
            return _danskin_dot(losses, p_t, float(V[0]) if self.penalized else None)
        return DanskinValue.apply(losses, torch.from_numpy(V).reshape(self.vshape), p_t)

    def solve(self, losses: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(P, V, D)``: the weights (the losses' shape and dtype), the values (``(B,)``) and the
        penalties ``λ D(p)`` (``(B,)`` float64) from one compiled call, or ``None`` (non-finite
        losses, a root-find that did not converge). Not for the ``legacy`` plans."""
        K: Any = self.kernels
        B, n = self.B, self.n
        a = losses.detach().numpy()
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        a = a.reshape(B, n)
        P = np.empty(self.shape, dtype=a.dtype)
        P2 = P.reshape(B, n)
        V = np.empty(B, dtype=a.dtype)
        D = np.empty(B)
        plan = self.plan
        if plan[0] == "closed":
            _, which, p1, p2, p3 = plan
            if not K.fused_closed_batch(which, a, p1, p2, p3, P2, V, D):
                return None
        elif plan[0] == "spectral":
            _, lam, kl, w, logw = plan
            if not K.fused_spectral_batch(a, w, logw, lam, kl, P2, V, D):
                return None
        else:
            _, which, p1, p2 = plan
            state = self.state  # the warm start: the roots of the last call with this signature
            X = None
            if state is not None and state.get("key") == self.key:
                X = state.get("x")
            if X is None:
                X = np.full(B, np.nan)
            status = K.fused_root_batch(which, a, p1, p2, self.tol, self.max_iter, X, P2, V, D)
            if status != 0:
                if status == 2 and state is not None:
                    state.clear()
                return None
            if state is not None:
                state["key"] = self.key
                state["x"] = X
        return P, V, D

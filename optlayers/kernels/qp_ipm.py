r"""The whole interior-point solve of a batch of dense QPs as one compiled call (Numba only).

Kernel ``"qp.interior_point"``::

    fn(Q, p, C, bh, k, reg, B, init, *, max_iter, rtol, floor, eps_inf, step_fraction, factor=False)
        -> (x, yc, s, tau, kappa, status (B,) int64, iterations (B,) int64, residual (B,), H0, delta
            [, L, d, ok])

with ``C = [A; G]``, ``bh = [b; h]``, ``reg`` the relative static regularization, ``init`` the
warm start ``(x, yc, s, τ, κ)`` or None, ``H0 = Q + δI + AᵀA/δ`` and, with ``factor``, the
factorization ``(L, d, ok)`` at the solution for the gradient (see
:mod:`optlayers.kernels.qp_ipm_numba`). Its specification is the PyTorch loop
:meth:`optlayers.solvers.qp.InteriorPoint._run` in the normal-equation form without refinement,
which the solver runs wherever this kernel is not chosen (non-CPU tensors, a forced non-Numba
backend, Numba missing, a ``callback``, ``check_every=None``, ``refine > 0``, the Schur form, or
``torch.func``-wrapped tensors); the tests compare the two. No gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._dispatch import Backend, register

__all__ = ["KERNEL_NAME"]

#: Name under which the Numba implementation is registered with the dispatch.
KERNEL_NAME = "qp.interior_point"


def _load_numba() -> Callable[..., Any]:
    from .qp_ipm_numba import qp_ipm_numba

    return qp_ipm_numba


register(KERNEL_NAME, Backend.NUMBA, _load_numba, min_size=1)

"""Arrays over raw addresses in Numba code: how a compiled kernel reads a tensor without NumPy.

A PyTorch tensor crosses into a Numba function as a NumPy view (``t.detach().numpy()``) and
back (``torch.from_numpy``): two Python-level conversions per array. In a training step, where
every Python and torch call runs with cold caches, those conversions around a few-µs kernel
cost tens of µs. :func:`void_pointer` turns an integer address (``t.data_ptr()``) into a
pointer inside compiled code, so ``numba.carray(void_pointer(addr), shape, dtype)`` is the
tensor's memory as an array with no conversion at all.

The caller is responsible for what the address means: the tensor must be on the CPU,
contiguous, of the dtype and size the kernel assumes, and alive for the whole call.

Example:
    >>> import numba, numpy as np, torch
    >>> from optlayers.kernels.numba_address import void_pointer
    >>> @numba.njit
    ... def total(addr, n):
    ...     return numba.carray(void_pointer(addr), (n,), np.float32).sum()
    >>> t = torch.arange(4, dtype=torch.float32)  # kept alive while the kernel reads it
    >>> float(total(t.data_ptr(), t.numel()))
    6.0
"""

from __future__ import annotations

from typing import Any

from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["void_pointer"]


@intrinsic
def void_pointer(typingctx: Any, address: Any) -> Any:  # pragma: no cover - compiled
    """The integer ``address`` as a ``void*`` (compiled code only)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen

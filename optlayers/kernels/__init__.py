"""Hot loops behind one dispatch: PyTorch reference, Numba (CPU), Triton (CUDA).

Importing this package imports neither Numba nor Triton; implementations are loaded lazily by
:func:`dispatch`. See :mod:`optlayers.kernels._dispatch` for the rules.
"""

from ._dispatch import (
    ENV_VAR,
    Backend,
    KernelUnavailableError,
    backend_available,
    call_count,
    dispatch,
    forced_backend,
    last_backend,
    register,
    registered_backends,
)

__all__ = [
    "Backend",
    "KernelUnavailableError",
    "ENV_VAR",
    "backend_available",
    "call_count",
    "dispatch",
    "forced_backend",
    "last_backend",
    "register",
    "registered_backends",
]

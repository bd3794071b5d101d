"""One dispatch for every hot loop: PyTorch reference, Numba (CPU) or Triton (CUDA).

A kernel is a *name* (``"dro.cvar"``, ``"ot.softmin"``, ...) with up to three
implementations registered under :class:`Backend` members. Each implementation is registered
as a *loader*: a zero-argument callable returning the function, called the first time the
backend is chosen. Loaders import Numba or Triton inside themselves, so importing optlayers
never imports either package.

Every backend of a kernel has the same signature and returns the same thing; the reference
implementation is the specification and the tests compare the others with it.

Choice of backend, in order:

1. the explicit ``backend=`` argument of :func:`dispatch`;
2. the environment variable ``OPTLAYERS_KERNELS=reference|numba|triton``;
3. automatic: Triton for CUDA tensors when it is importable and registered; Numba for CPU
   tensors when it is importable, registered, and the problem size lies in the range where the
   registered Numba version was measured to win (``min_size ≤ size ≤ max_size`` of
   :func:`register`: some compiled loops win only on large problems, others — whose gain is
   the reference's per-call overhead — only on small ones); otherwise the reference. Under a
   ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) always the reference: the
   compiled kernels read raw memory, which the transforms' wrapped tensors do not have.

A backend chosen by 1 or 2 (a *forced* backend) that is not registered for the kernel, whose
package cannot be imported, or that cannot run on the device raises
:class:`KernelUnavailableError`: there is no silent fallback. In automatic mode a package that
is installed but fails to import falls back to the reference with a warning.

:func:`last_backend` reports which backend last *ran* a kernel (recorded when the function
returned by :func:`dispatch` is called), so tests can assert it; :func:`call_count` counts the
calls per kernel and backend (e.g. to prove that a convergence check costs no extra kernel
call).

Example:
    >>> import torch
    >>> from optlayers.kernels import Backend, register, dispatch, last_backend
    >>> register("demo.double", Backend.REFERENCE, lambda: (lambda x: 2 * x))
    >>> fn = dispatch("demo.double", device=torch.device("cpu"), size=3)
    >>> fn(torch.ones(3)).tolist()
    [2.0, 2.0, 2.0]
    >>> last_backend("demo.double")
    <Backend.REFERENCE: 'reference'>
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "Backend",
    "KernelUnavailableError",
    "register",
    "dispatch",
    "last_backend",
    "call_count",
    "registered_backends",
    "backend_available",
    "forced_backend",
    "ENV_VAR",
]

ENV_VAR = "OPTLAYERS_KERNELS"


class Backend(enum.Enum):
    """Implementations a kernel may have.

    ``REFERENCE`` is the PyTorch specification (any device, differentiable ops), ``NUMBA`` a
    compiled CPU loop, ``TRITON`` a CUDA kernel, ``COMPILED`` the reference expression fused by
    ``torch.compile`` (Inductor; opt-in only: never chosen automatically, because its first call
    in a process costs seconds); all compute the same function.

    Example:
        >>> from optlayers.kernels import Backend
        >>> Backend.parse("Numba")
        <Backend.NUMBA: 'numba'>
        >>> [b.value for b in Backend]
        ['reference', 'numba', 'triton', 'compiled']
    """

    REFERENCE = "reference"
    NUMBA = "numba"
    TRITON = "triton"
    COMPILED = "compiled"

    @classmethod
    def parse(cls, value: Backend | str) -> Backend:
        """Map a member or its name (``"numba"``, case-insensitive) to exactly one member.

        Raises:
            ValueError: for an unknown name; the message lists the valid ones.

        Example:
            >>> from optlayers.kernels import Backend
            >>> Backend.parse(" TRITON ") is Backend.TRITON
            True
        """
        if isinstance(value, Backend):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value == key:
                    return member
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown kernel backend {value!r}; valid backends are {valid}")


class KernelUnavailableError(RuntimeError):
    """A forced backend cannot run this kernel (not registered, not importable, wrong device).

    Example:
        >>> import torch
        >>> from optlayers.kernels import Backend, KernelUnavailableError, dispatch, register
        >>> register("doc.unavailable", Backend.REFERENCE, lambda: torch.neg)
        >>> try:
        ...     dispatch("doc.unavailable", backend="triton")
        ... except KernelUnavailableError as err:
        ...     print(err)
        kernel 'doc.unavailable' has no triton implementation (backend= argument); registered: reference
    """


@dataclasses.dataclass
class _Entry:
    loader: Callable[[], Callable[..., Any]]
    min_size: int = 0
    max_size: int | None = None
    fn: Callable[..., Any] | None = None
    wrapped: Callable[..., Any] | None = None


_REGISTRY: dict[str, dict[Backend, _Entry]] = {}
_LAST: dict[str, Backend] = {}
_CALLS: dict[tuple[str, Backend], int] = {}
_BROKEN: dict[Backend, str] = {}
_LOCK = threading.Lock()

_PACKAGE = {Backend.NUMBA: "numba", Backend.TRITON: "triton", Backend.COMPILED: "torch._inductor"}


def register(kernel_name: str, backend: Backend | str, fn_loader: Callable[[], Callable[..., Any]],
             *, min_size: int = 0, max_size: int | None = None) -> None:
    """Register one implementation of a kernel.

    Args:
        kernel_name: Dotted kernel name, e.g. ``"dro.cvar"``.
        backend: Which implementation this is.
        fn_loader: Zero-argument callable returning the function; it is called lazily, the
            first time this backend is chosen, so it may import Numba or Triton.
        min_size: Automatic dispatch picks this backend only for problems of at least this
            size (where it was measured to beat the reference). Ignored when forced.
        max_size: Automatic dispatch picks this backend only for problems of at most this
            size (None: no upper bound). Ignored when forced.

    Raises:
        ValueError: ``backend`` names no backend, or ``max_size < min_size``.
        TypeError: ``fn_loader`` is not callable.

    Example:
        >>> import torch
        >>> from optlayers.kernels import Backend, register, registered_backends, dispatch
        >>> register("doc.square", Backend.REFERENCE, lambda: torch.square)
        >>> register("doc.square", "numba", lambda: torch.square, min_size=10_000)
        >>> registered_backends("doc.square")
        (<Backend.REFERENCE: 'reference'>, <Backend.NUMBA: 'numba'>)
        >>> dispatch("doc.square", backend="reference")(torch.tensor([3.0])).tolist()
        [9.0]
    """
    b = Backend.parse(backend)
    if not callable(fn_loader):
        raise TypeError("fn_loader must be a zero-argument callable returning the kernel function")
    if max_size is not None and int(max_size) < int(min_size):
        raise ValueError(f"max_size={max_size} is below min_size={min_size}: the backend could never be "
                         "chosen automatically")
    with _LOCK:
        _REGISTRY.setdefault(kernel_name, {})[b] = _Entry(
            fn_loader, int(min_size), None if max_size is None else int(max_size))


def registered_backends(kernel_name: str) -> tuple[Backend, ...]:
    """The backends registered for ``kernel_name`` (empty when the name is unknown).

    Example:
        >>> import torch
        >>> from optlayers.kernels import Backend, register, registered_backends
        >>> register("doc.registered", Backend.REFERENCE, lambda: torch.abs)
        >>> registered_backends("doc.registered"), registered_backends("doc.no_such_kernel")
        ((<Backend.REFERENCE: 'reference'>,), ())
    """
    return tuple(_REGISTRY.get(kernel_name, {}))


def backend_available(backend: Backend | str) -> bool:
    """Whether the package a backend needs is installed (found without importing it).

    The reference backend is always available; Numba and Triton need their package (and report
    False after it failed to import once).

    Example:
        >>> from optlayers.kernels import backend_available
        >>> backend_available("reference")
        True
        >>> isinstance(backend_available("numba"), bool)
        True
    """
    b = Backend.parse(backend)
    if b is Backend.REFERENCE:
        return True
    if b in _BROKEN:
        return False
    return importlib.util.find_spec(_PACKAGE[b]) is not None


def forced_backend() -> Backend | None:
    """The backend forced by ``OPTLAYERS_KERNELS`` (None when unset or ``auto``).

    Callers that can bypass a kernel altogether (e.g. Sinkhorn's matrix-vector iteration on a
    stored cost) check this so that a forced backend really runs.

    Raises:
        ValueError: the variable names no backend.

    Example:
        >>> import os
        >>> from unittest import mock
        >>> from optlayers.kernels import forced_backend
        >>> with mock.patch.dict(os.environ, {"OPTLAYERS_KERNELS": "numba"}):
        ...     forced_backend()
        <Backend.NUMBA: 'numba'>
        >>> with mock.patch.dict(os.environ, {"OPTLAYERS_KERNELS": "auto"}):
        ...     print(forced_backend())
        None
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env.lower() == "auto":
        return None
    try:
        return Backend.parse(env)
    except ValueError as exc:
        raise ValueError(f"environment variable {ENV_VAR}={env!r}: {exc}") from None


def last_backend(kernel_name: str) -> Backend | None:
    """The backend that last ran ``kernel_name`` in this process, or None if it never ran.

    Recorded when the function returned by :func:`dispatch` is *called*, not when it is chosen.

    Example:
        >>> import torch
        >>> from optlayers.kernels import Backend, dispatch, last_backend, register
        >>> register("doc.last", Backend.REFERENCE, lambda: torch.exp)
        >>> fn = dispatch("doc.last", backend="reference")
        >>> print(last_backend("doc.last"))
        None
        >>> _ = fn(torch.zeros(2))
        >>> last_backend("doc.last")
        <Backend.REFERENCE: 'reference'>
    """
    return _LAST.get(kernel_name)


def call_count(kernel_name: str, backend: Backend | str | None = None) -> int:
    """How many times ``kernel_name`` ran in this process (through :func:`dispatch`), on one
    backend or (``backend=None``) on all of them together.

    Example:
        >>> import torch
        >>> from optlayers.kernels import call_count, dispatch, register
        >>> register("doc.count", "reference", lambda: torch.neg)
        >>> before = call_count("doc.count")
        >>> fn = dispatch("doc.count", backend="reference")
        >>> _ = fn(torch.ones(1)); _ = fn(torch.ones(1))
        >>> call_count("doc.count") - before, call_count("doc.count", "numba")
        (2, 0)
    """
    if backend is None:
        return sum(c for (name, _), c in list(_CALLS.items()) if name == kernel_name)
    return _CALLS.get((kernel_name, Backend.parse(backend)), 0)


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def _runs_on(backend: Backend, device_type: str) -> bool:
    if backend is Backend.NUMBA:
        return device_type == "cpu"
    if backend is Backend.TRITON:
        return device_type == "cuda"
    return True


def _load(kernel_name: str, backend: Backend, entry: _Entry) -> Callable[..., Any]:
    if entry.wrapped is None:
        fn = entry.loader()
        entry.fn = fn

        key = (kernel_name, backend)
        numba = backend is Backend.NUMBA

        def run(*args: Any, **kwargs: Any) -> Any:
            _LAST[kernel_name] = backend
            _CALLS[key] = _CALLS.get(key, 0) + 1
            if not numba:
                return fn(*args, **kwargs)
            # Numba's OpenMP threading layer shares the OpenMP runtime with PyTorch and, when it
            # starts, resets the thread count to NUMBA_NUM_THREADS: a user's
            # torch.set_num_threads(k) would silently be undone. Keep PyTorch's setting.
            threads = torch.get_num_threads()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)

        run.__name__ = getattr(fn, "__name__", kernel_name)
        run.__doc__ = getattr(fn, "__doc__", None)
        run.backend = backend  # type: ignore[attr-defined]
        entry.wrapped = run
    return entry.wrapped


def _forced(kernel_name: str, backend: Backend, device_type: str, how: str) -> Callable[..., Any]:
    entries = _REGISTRY.get(kernel_name)
    if not entries:
        raise KernelUnavailableError(f"no kernel named {kernel_name!r} is registered")
    if backend not in entries:
        have = ", ".join(b.value for b in entries)
        raise KernelUnavailableError(
            f"kernel {kernel_name!r} has no {backend.value} implementation ({how}); "
            f"registered: {have}")
    if not _runs_on(backend, device_type):
        raise KernelUnavailableError(
            f"the {backend.value} implementation of {kernel_name!r} cannot run on a "
            f"{device_type} tensor ({how})")
    if not backend_available(backend):
        why = _BROKEN.get(backend, f"the package {_PACKAGE.get(backend)!r} is not installed")
        raise KernelUnavailableError(f"backend {backend.value} was forced ({how}) but {why}")
    try:
        return _load(kernel_name, backend, entries[backend])
    except ImportError as exc:  # installed but broken
        raise KernelUnavailableError(
            f"backend {backend.value} was forced ({how}) but failed to load: {exc}") from exc


def dispatch(kernel_name: str, *, backend: Backend | str | None = None,
             device: torch.device | str | None = None, size: int = 0) -> Callable[..., Any]:
    """Choose and return the implementation of ``kernel_name`` for a problem.

    Args:
        kernel_name: A registered kernel name.
        backend: Force a backend (member or name). None defers to ``OPTLAYERS_KERNELS`` and then
            to the automatic choice.
        device: Device of the tensors the kernel will run on (default CPU).
        size: Problem size (kernel-specific, e.g. the number of losses), compared with the
            ``min_size`` and ``max_size`` a backend was registered with.

    Returns:
        The function; calling it records its backend for :func:`last_backend`.

    Raises:
        KernelUnavailableError: a forced backend cannot run, or nothing is registered.
        ValueError: ``backend`` or ``OPTLAYERS_KERNELS`` names no backend.

    Example:
        A Numba version registered with ``min_size=1000`` is never picked automatically for a
        smaller problem; the reference runs instead:

        >>> import os
        >>> from unittest import mock
        >>> import torch
        >>> from optlayers.kernels import Backend, dispatch, last_backend, register
        >>> register("doc.sum", Backend.REFERENCE, lambda: torch.sum)
        >>> register("doc.sum", Backend.NUMBA, lambda: torch.sum, min_size=1000)
        >>> with mock.patch.dict(os.environ, {"OPTLAYERS_KERNELS": "auto"}):
        ...     fn = dispatch("doc.sum", device="cpu", size=10)
        >>> fn(torch.arange(4.0)).item()
        6.0
        >>> last_backend("doc.sum")
        <Backend.REFERENCE: 'reference'>
    """
    device_type = _device_type(device)
    if backend is not None:
        return _forced(kernel_name, Backend.parse(backend), device_type, "backend= argument")
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() != "auto":
        try:
            forced = Backend.parse(env)
        except ValueError as exc:
            raise ValueError(f"environment variable {ENV_VAR}={env!r}: {exc}") from None
        return _forced(kernel_name, forced, device_type, f"{ENV_VAR}={env}")
    entries = _REGISTRY.get(kernel_name)
    if not entries:
        raise KernelUnavailableError(f"no kernel named {kernel_name!r} is registered")
    order: tuple[Backend, ...] = (Backend.TRITON,) if device_type == "cuda" else (Backend.NUMBA,)
    if torch._C._are_functorch_transforms_active():
        order = ()  # compiled kernels read raw memory, which torch.func's wrapped tensors do not have
    for b in order:
        entry = entries.get(b)
        if (entry is None or size < entry.min_size
                or (entry.max_size is not None and size > entry.max_size) or not backend_available(b)):
            continue
        try:
            return _load(kernel_name, b, entry)
        except ImportError as exc:
            _BROKEN[b] = f"importing it failed ({exc})"
            warnings.warn(f"optlayers: the {b.value} backend failed to load ({exc}); using the "
                          "PyTorch reference", RuntimeWarning, stacklevel=2)
    if Backend.REFERENCE not in entries:
        raise KernelUnavailableError(
            f"kernel {kernel_name!r} has no reference implementation and no other backend "
            f"can run on {device_type}")
    return _load(kernel_name, Backend.REFERENCE, entries[Backend.REFERENCE])

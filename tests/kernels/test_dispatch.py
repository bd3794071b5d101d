"""Kernel dispatch rules, lazy imports, and the DRO Numba kernels against their references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import optlayers.kernels._dispatch as D
from optlayers.kernels import (
    Backend,
    KernelUnavailableError,
    call_count,
    dispatch,
    last_backend,
    register,
    registered_backends,
)
from optlayers.solvers.dro import ChiSquareBall, CVaR, Spectral, esrm, extremile, robust_weights, superquantile
from optlayers.solvers.dro.chi_square import chi2_ball_reference
from optlayers.solvers.dro.cvar import cvar_reference
from optlayers.solvers.dro.spectral import perm_proj_kl_reference, perm_proj_l2_reference

HAS_NUMBA = D.backend_available(Backend.NUMBA)
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ENV_VAR, raising=False)


def _toy(name: str) -> None:
    register(name, Backend.REFERENCE, lambda: (lambda x: ("ref", x)))
    register(name, "numba", lambda: (lambda x: ("numba", x)), min_size=100)


def test_backend_parse() -> None:
    assert Backend.parse("NUMBA") is Backend.NUMBA
    assert Backend.parse(Backend.TRITON) is Backend.TRITON
    with pytest.raises(ValueError, match="'reference', 'numba', 'triton'"):
        Backend.parse("cuda")


def test_explicit_backend_and_record() -> None:
    _toy("test.toy1")
    assert set(registered_backends("test.toy1")) == {Backend.REFERENCE, Backend.NUMBA}
    fn = dispatch("test.toy1", backend="reference", size=10**6)
    assert last_backend("test.toy1") is None  # recorded when it runs, not when chosen
    assert fn(1) == ("ref", 1) and last_backend("test.toy1") is Backend.REFERENCE
    if HAS_NUMBA:
        assert dispatch("test.toy1", backend=Backend.NUMBA, size=1)(2) == ("numba", 2)
        assert last_backend("test.toy1") is Backend.NUMBA


def test_forced_unavailable_raises() -> None:
    _toy("test.toy2")
    with pytest.raises(KernelUnavailableError, match="no triton implementation"):
        dispatch("test.toy2", backend="triton")
    with pytest.raises(KernelUnavailableError, match="cannot run on a cuda"):
        dispatch("test.toy2", backend="numba", device="cuda")
    with pytest.raises(KernelUnavailableError, match="no kernel named"):
        dispatch("test.nothing")


def test_automatic_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    _toy("test.toy3")
    # small problems: the reference; large: numba when installed
    assert dispatch("test.toy3", size=10)(0)[0] == "ref"
    assert dispatch("test.toy3", size=1000)(0)[0] == ("numba" if HAS_NUMBA else "ref")
    # CUDA tensors never get numba; no triton registered -> reference
    assert dispatch("test.toy3", device="cuda", size=1000)(0)[0] == "ref"
    # numba missing: automatic falls back, forcing raises
    real = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    assert dispatch("test.toy3", size=1000)(0)[0] == "ref"
    assert last_backend("test.toy3") is Backend.REFERENCE
    with pytest.raises(KernelUnavailableError, match="not installed"):
        dispatch("test.toy3", backend="numba")


def test_automatic_choice_is_the_reference_under_torch_func() -> None:
    """Compiled kernels read raw memory, which torch.func's wrapped tensors lack."""
    _toy("test.toy_func")
    want = "numba" if HAS_NUMBA else "ref"
    chosen = []

    def f(x: torch.Tensor) -> torch.Tensor:
        chosen.append(dispatch("test.toy_func", size=1000)(0)[0])
        return x.sum()

    assert dispatch("test.toy_func", size=1000)(0)[0] == want
    torch.func.grad(f)(torch.ones(3))
    torch.func.vmap(f)(torch.ones(2, 3))
    assert chosen == ["ref", "ref"]
    assert dispatch("test.toy_func", size=1000)(0)[0] == want  # and back outside the transform


def test_automatic_size_window() -> None:
    """``max_size``: a backend that wins only on small problems is not chosen above it."""
    register("test.window", Backend.REFERENCE, lambda: (lambda: "ref"))
    register("test.window", "numba", lambda: (lambda: "numba"), min_size=10, max_size=100)
    want = "numba" if HAS_NUMBA else "ref"
    assert [dispatch("test.window", size=s)() for s in (9, 10, 100, 101)] == ["ref", want, want, "ref"]
    # forcing ignores the window
    if HAS_NUMBA:
        assert dispatch("test.window", backend="numba", size=10**9)() == "numba"
    with pytest.raises(ValueError, match="max_size=5 is below min_size=10"):
        register("test.window_bad", "numba", lambda: (lambda: 0), min_size=10, max_size=5)


def test_call_count_per_backend() -> None:
    _toy("test.count")
    assert call_count("test.count") == 0
    ref = dispatch("test.count", backend="reference")
    for _ in range(3):
        ref(0)
    assert call_count("test.count") == 3 and call_count("test.count", "reference") == 3
    assert call_count("test.count", Backend.NUMBA) == 0
    if HAS_NUMBA:
        dispatch("test.count", backend="numba")(0)
        assert call_count("test.count") == 4 and call_count("test.count", "numba") == 1


def test_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    _toy("test.toy4")
    monkeypatch.setenv(D.ENV_VAR, "reference")
    assert dispatch("test.toy4", size=10**6)(0)[0] == "ref"
    monkeypatch.setenv(D.ENV_VAR, "triton")
    with pytest.raises(KernelUnavailableError, match="OPTLAYERS_KERNELS=triton"):
        dispatch("test.toy4")
    monkeypatch.setenv(D.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="OPTLAYERS_KERNELS"):
        dispatch("test.toy4")
    # the explicit argument wins over the environment
    assert dispatch("test.toy4", backend="reference")(0)[0] == "ref"


def test_importing_optlayers_imports_no_numba_or_triton() -> None:
    code = ("import sys, optlayers, optlayers.kernels, optlayers.distributed, optlayers.solvers.dro, "
            "optlayers.layers.dro; print('numba' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


@needs_numba
def test_numba_kernel_keeps_torch_thread_count() -> None:
    """Numba's OpenMP layer resets the shared OpenMP thread count when it starts; the dispatch
    restores PyTorch's setting (fresh process: the layer starts once per process)."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from optlayers.kernels import dispatch\n"
            "from optlayers.kernels.softmin_reference import SqEuclideanSource\n"
            "x, y = torch.rand(1, 40, 2), torch.rand(1, 30, 2)\n"
            "for _ in range(2):\n"
            "    dispatch('ot.softmin', backend='numba')(SqEuclideanSource(x, y), torch.zeros(1, 30), torch.ones(1))\n"
            "print(torch.get_num_threads())")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    env.pop(D.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == "1", out.stdout + out.stderr


# ------------------------------------------------------------------------------- DRO kernels


def _rows(B: int, n: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, generator=g, dtype=torch.float64)
    return L.round() if ties else L


@needs_numba
@pytest.mark.kernels
@pytest.mark.parametrize("B,n", [(1, 1), (1, 2), (3, 7), (2, 100), (1, 1000)])
@pytest.mark.parametrize("ties", [False, True])
def test_numba_kernels_match_reference(B: int, n: int, ties: bool) -> None:
    from optlayers.kernels.dro_kernels import chi2_ball_numba, cvar_numba, perm_proj_kl_numba, perm_proj_l2_numba

    L = _rows(B, n, n, ties)
    for alpha in (1.0 / n, 0.13, 0.5, 1.0):
        for a, b in zip(cvar_numba(L, alpha), cvar_reference(L, alpha), strict=True):
            assert torch.allclose(a, b, atol=1e-15)
    for rho in (0.0, 0.05, 1.0, float(n)):
        pa, ea, ca = chi2_ball_numba(L, rho)
        pb, eb, cb = chi2_ball_reference(L, rho)
        assert torch.allclose(pa, pb, atol=1e-12)
        assert torch.allclose(ea, eb, atol=1e-10, equal_nan=True)
    for w in (extremile(2.0).weights(n).flip(0), superquantile(0.5).weights(n).flip(0)):  # 2nd: zero tail
        for scale in (0.01, 1.0, 100.0):
            assert torch.allclose(perm_proj_l2_numba(scale * L, w), perm_proj_l2_reference(scale * L, w), atol=1e-13)
            assert torch.allclose(perm_proj_kl_numba(scale * L, w), perm_proj_kl_reference(scale * L, w), atol=1e-13)


@needs_numba
@pytest.mark.kernels
@pytest.mark.parametrize("spec,kernel", [
    (CVaR(0.1), "dro.cvar"),
    (ChiSquareBall(0.5), "dro.chi2_ball"),
    (Spectral(esrm(2.0), lam=0.1), "dro.perm_proj_l2"),
    (Spectral(esrm(2.0), lam=0.1, divergence="kl"), "dro.perm_proj_kl"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_robust_weights_runs_the_backend_it_reports(spec, kernel: str, dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    L = _rows(2, 64, 0, False).to(dtype)
    ref = robust_weights(L, spec, backend="reference")
    assert last_backend(kernel) is Backend.REFERENCE
    nb = robust_weights(L, spec, backend="numba")
    assert last_backend(kernel) is Backend.NUMBA
    assert torch.allclose(ref.solution, nb.solution, atol=1e-6 if dtype == torch.float32 else 1e-13)
    monkeypatch.setenv(D.ENV_VAR, "reference")
    robust_weights(L, spec)
    assert last_backend(kernel) is Backend.REFERENCE
    monkeypatch.setenv(D.ENV_VAR, "numba")
    robust_weights(L, spec)
    assert last_backend(kernel) is Backend.NUMBA

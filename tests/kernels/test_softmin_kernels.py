"""Sinkhorn soft-min / transport-apply kernels (reference, Numba, Triton) against the reference."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import optlayers.kernels._dispatch as D
from optlayers.kernels import Backend, KernelUnavailableError, dispatch, last_backend, registered_backends
from optlayers.kernels.softmin import KERNEL_APPLY, SOFTMIN, transport_displacement
from optlayers.kernels.softmin_reference import (
    CallableSource,
    DenseSource,
    PNormSource,
    SqEuclideanSource,
    kernel_apply_reference,
    softmin_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see tests/conftest.py


HAS_NUMBA = D.backend_available(Backend.NUMBA)
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[2]
FORCED = os.environ.get(D.ENV_VAR, "")  # read before the fixture clears it

# (B, n, m, d): tiny, ragged (not multiples of the tiles), batch 1 and > 1
SHAPES = [(1, 1, 1, 1), (1, 3, 2, 2), (2, 5, 7, 3), (3, 33, 17, 2), (1, 40, 70, 5)]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ENV_VAR, raising=False)


def _sources(B: int, n: int, m: int, d: int, dtype: torch.dtype, seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64).to(dtype)
    c = torch.rand(B, n, m, generator=g, dtype=torch.float64).to(dtype)
    return [SqEuclideanSource(x, y, 0.5), PNormSource(x, y, 1.0), PNormSource(x, y, 1.5, 2.0), DenseSource(c),
            DenseSource(c.transpose(-1, -2).contiguous().transpose(-1, -2))]


def _inputs(B: int, n: int, m: int, dtype: torch.dtype, seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(B, m, generator=g, dtype=torch.float64).to(dtype)
    if m > 2:
        h[:, 1] = -math.inf  # a zero weight / padding entry
    eps = (0.05 + torch.rand(B, generator=g, dtype=torch.float64)).to(dtype)
    alpha = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype)
    beta = torch.randn(B, m, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, m, 3, generator=g, dtype=torch.float64).to(dtype)
    return h, eps, alpha, beta, v


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


def _check_against_reference(softmin_fn, apply_fn, dtype: torch.dtype, shapes=SHAPES) -> None:  # noqa: ANN001
    for k, (B, n, m, d) in enumerate(shapes):
        h, eps, alpha, beta, v = _inputs(B, n, m, dtype, k)
        for src in _sources(B, n, m, d, dtype, k):
            got = softmin_fn(src, h, eps)
            assert got.shape == (B, n) and got.dtype == dtype
            torch.testing.assert_close(got, softmin_reference(src, h, eps), **_tol(dtype))
            got = apply_fn(src, alpha, beta, eps, v)
            assert got.shape == (B, n, 3) and got.dtype == dtype
            torch.testing.assert_close(got, kernel_apply_reference(src, alpha, beta, eps, v), **_tol(dtype))
            # the other direction: transposed source, vectors of the other side
            st = src.transpose()
            ht = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(k)).to(dtype)
            torch.testing.assert_close(softmin_fn(st, ht, eps), softmin_reference(st, ht, eps), **_tol(dtype))


def _check_nonfinite(softmin_fn) -> None:  # noqa: ANN001
    src = _sources(2, 4, 5, 2, torch.float64, 7)[0]
    h = torch.randn(2, 5, dtype=torch.float64)
    h[0] = -math.inf  # every column ignored -> +inf
    h[1, 2] = math.inf  # -> -inf
    eps = torch.tensor([0.3, 0.3], dtype=torch.float64)
    ref = softmin_reference(src, h, eps)
    got = softmin_fn(src, h, eps)
    assert torch.equal(torch.isposinf(ref), torch.isposinf(got)) and bool(torch.isposinf(got[0]).all())
    assert torch.equal(torch.isneginf(ref), torch.isneginf(got)) and bool(torch.isneginf(got[1]).all())
    h2 = torch.randn(2, 5, dtype=torch.float64)
    h2[1, 3] = math.nan
    ref, got = softmin_reference(src, h2, eps), softmin_fn(src, h2, eps)
    torch.testing.assert_close(got, ref, equal_nan=True)
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isfinite(got[0]).all())


def test_registered_and_lazy() -> None:
    every = {Backend.REFERENCE, Backend.NUMBA, Backend.TRITON, Backend.COMPILED}
    assert set(registered_backends(SOFTMIN)) == every
    assert set(registered_backends(KERNEL_APPLY)) == every
    code = ("import sys\nimport optlayers.solvers.ot, optlayers.kernels.softmin\n"
            "print('numba' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_fast_path_matches_specification(dtype: torch.dtype) -> None:
    fn_s = dispatch(SOFTMIN, backend="reference")
    fn_a = dispatch(KERNEL_APPLY, backend="reference")
    _check_against_reference(fn_s, fn_a, dtype)
    assert last_backend(SOFTMIN) is Backend.REFERENCE and last_backend(KERNEL_APPLY) is Backend.REFERENCE


@pytest.mark.kernels
@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    import optlayers.kernels.softmin_numba as N

    monkeypatch.setattr(N, "_alloc", lambda shape, dt: np.full(shape, np.nan, dtype=dt))  # poisoned outputs
    fn_s = dispatch(SOFTMIN, backend="numba")
    fn_a = dispatch(KERNEL_APPLY, backend="numba")
    _check_against_reference(fn_s, fn_a, dtype)
    assert last_backend(SOFTMIN) is Backend.NUMBA and last_backend(KERNEL_APPLY) is Backend.NUMBA
    _check_nonfinite(fn_s)


def test_user_cost_and_forced_device() -> None:
    with pytest.raises(KernelUnavailableError, match="cannot run on a cpu|not importable|cannot run"):
        dispatch(SOFTMIN, backend="triton", device="cpu")
    if not HAS_TRITON:
        return  # the Triton module itself needs triton; the dispatch refusal above is the CI check
    src = CallableSource(torch.rand(1, 3, 2), torch.rand(1, 4, 2), lambda u, w: torch.cdist(u, w))
    from optlayers.kernels.softmin_triton import _source_args  # noqa: PLC0415

    with pytest.raises(ValueError, match="user costs run on the reference"):
        _source_args(src, torch.zeros(1))


def test_transport_displacement_matches_dense() -> None:
    B, n, m, d = 2, 6, 5, 3
    src = _sources(B, n, m, d, torch.float64, 3)[0]
    _, eps, alpha, beta, _ = _inputs(B, n, m, torch.float64, 3)
    P = torch.exp(alpha[:, :, None] + beta[:, None, :] - src.block(0, n) / eps[:, None, None])
    expected = (P[..., None] * (src.x[:, :, None, :] - src.y[:, None, :, :])).sum(2)
    got = transport_displacement(src.x, src.y, src, alpha, beta, eps, backend="reference")
    torch.testing.assert_close(got, expected)


@pytest.mark.kernels
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(FORCED.lower() not in ("", "auto", "reference", "triton"),
                    reason="the interpreter test runs once, in the reference/automatic pass")
def test_triton_interpreter_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        # TRITON_INTERPRET is read when a kernel is first compiled: run in a fresh process
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        env.pop(D.ENV_VAR, None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_triton_interpreter_matches_reference"],
                              env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout
        return
    import optlayers.kernels.softmin_triton as T

    monkeypatch.setattr(T, "_alloc", lambda *s, dtype, device: torch.full(s, math.nan, dtype=dtype, device=device))
    # declared for CUDA; the interpreter runs CPU tensors
    fn_s = dispatch(SOFTMIN, backend="triton", device="cuda")
    fn_a = dispatch(KERNEL_APPLY, backend="triton", device="cuda")
    # the interpreter is slow: a few shapes (tiny, ragged, batched), both dtypes
    _check_against_reference(fn_s, fn_a, torch.float64, SHAPES[:3])
    _check_against_reference(fn_s, fn_a, torch.float32, [SHAPES[0], SHAPES[3]])
    assert last_backend(SOFTMIN) is Backend.TRITON and last_backend(KERNEL_APPLY) is Backend.TRITON
    _check_nonfinite(fn_s)
    # the marginal error accumulated in the epilogue
    src = _sources(2, 9, 6, 2, torch.float64, 5)[0]
    h, eps, _, _, _ = _inputs(2, 9, 6, torch.float64, 5)
    f_prev = torch.randn(2, 9, dtype=torch.float64) * 0.01
    a = torch.rand(2, 9, dtype=torch.float64)
    f, err = T.softmin_triton(src, h, eps, error=(f_prev, a, 0.7))
    f_ref = softmin_reference(src, h, eps)
    torch.testing.assert_close(f, f_ref)
    expected = (a * (torch.exp((f_prev - 0.7 * f_ref) / eps[:, None]) - 1).abs()).sum(-1)
    torch.testing.assert_close(err, expected)

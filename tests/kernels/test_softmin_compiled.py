"""The opt-in ``compiled`` backend (torch.compile of the reference expressions) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

import optlayers.kernels._dispatch as D
from optlayers.kernels import Backend, KernelUnavailableError, dispatch, last_backend
from optlayers.kernels.softmin import KERNEL_APPLY, SOFTMIN
from optlayers.kernels.softmin_reference import (
    CallableSource,
    DenseSource,
    PNormSource,
    SqEuclideanSource,
    kernel_apply_reference,
    softmin_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ENV_VAR, raising=False)


def _call(kernel: str, *args):  # noqa: ANN202
    fn = dispatch(kernel, backend="compiled")
    try:
        return fn(*args)
    except KernelUnavailableError as exc:  # no C++ compiler on this machine: nothing to compare
        pytest.skip(str(exc))


def test_compiled_matches_reference() -> None:
    dtype, tol = torch.float64, 1e-10  # one dtype: every new dtype compiles again (seconds each)
    g = torch.Generator().manual_seed(3)
    B, n, m, d = 2, 7, 5, 3
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64).to(dtype)
    y[0, 2] = x[0, 4]  # a coincident pair: the p-norm cost is exactly 0 there
    c = torch.rand(B, n, m, generator=g, dtype=torch.float64).to(dtype)
    h = torch.randn(B, m, generator=g, dtype=torch.float64).to(dtype)
    h[:, 1] = -math.inf  # zero weight / padding
    eps = torch.tensor([0.3, 0.07], dtype=dtype)
    alpha = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, m, 2, generator=g, dtype=torch.float64).to(dtype)
    for src in (SqEuclideanSource(x, y, 0.5), PNormSource(x, y, 1.0, 2.0), DenseSource(c)):
        out = _call(SOFTMIN, src, h, eps)
        assert last_backend(SOFTMIN) is Backend.COMPILED
        ref = softmin_reference(src, h, eps)
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        out = _call(KERNEL_APPLY, src, alpha, h, eps, v)
        torch.testing.assert_close(out, kernel_apply_reference(src, alpha, h, eps, v), rtol=tol, atol=tol)


def test_compiled_is_opt_in_and_rejects_user_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 3, 2)
    auto = dispatch(SOFTMIN, device="cpu", size=1 << 40)  # however large: never chosen automatically
    auto(SqEuclideanSource(x, x), torch.zeros(1, 3), torch.ones(1))
    assert last_backend(SOFTMIN) is not Backend.COMPILED
    monkeypatch.setenv(D.ENV_VAR, "compiled")
    assert D.forced_backend() is Backend.COMPILED
    with pytest.raises(ValueError, match="dense, squared-Euclidean or p-norm"):
        dispatch(SOFTMIN)(CallableSource(x, x, torch.cdist), torch.zeros(1, 3), torch.ones(1))

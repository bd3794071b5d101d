"""The fused (Numba) training fast path of ``DROLoss`` against ``robust_weights``."""

from __future__ import annotations

import math
import os
from unittest import mock

import numpy as np
import pytest
import torch

from optlayers import ConvergenceError
from optlayers.layers.dro import DROLoss
from optlayers.solvers.dro import (
    ChiSquareBall,
    ChiSquarePenalty,
    CressieRead,
    CVaR,
    HolisticRobust,
    KLBall,
    KLPenalty,
    Spectral,
    TotalVariation,
    esrm,
    extremile,
    robust_weights,
    superquantile,
)
from optlayers.solvers.dro.fused import FusedRunner, fused_robust_value, fused_supported

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # the fast path is the automatic (and the forced-Numba) choice; CI passes that force another
    # backend would turn it off
    monkeypatch.delenv("OPTLAYERS_KERNELS", raising=False)

SPECS = [
    CVaR(0.1), CVaR(0.37), CVaR(1.0), TotalVariation(0.1), TotalVariation(1.0), TotalVariation(0.0),
    ChiSquareBall(1.0), ChiSquareBall(0.0), ChiSquareBall(50.0), ChiSquarePenalty(1.0), ChiSquarePenalty(0.01),
    KLBall(0.5), KLBall(1e-4), KLBall(20.0), KLPenalty(1.0), KLPenalty(0.3, optimistic=True),
    CressieRead(3.0, rho=0.5), CressieRead(1.5, rho=0.01), CressieRead(1.5, rho=1e-5), CressieRead(4.0, rho=100.0),
    CressieRead(1.5, lam=1.0), CressieRead(4.0, lam=0.1), CressieRead(3.0, lam=0.05),
    Spectral(esrm(1.0), lam=0.1), Spectral(extremile(2.0), lam=0.1, divergence="kl"),
    # KL penalty: a spread of l / lam over 700 (the log-domain PAV) and a spectrum with zero weights
    Spectral(extremile(2.0), lam=0.004, divergence="kl"), Spectral(superquantile(0.3), lam=0.1, divergence="kl"),
    HolisticRobust(0.05, 0.1), HolisticRobust(0.05, 0.0), HolisticRobust(0.3, 1.0),
]


def _losses(shape: tuple[int, ...], dtype: torch.dtype, seed: int, ties: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    L = torch.rand(shape, generator=gen, dtype=torch.float64) * 3.0
    if ties and shape[-1] >= 4:
        L[..., :3] = L.amax(-1, keepdim=True)  # tied maxima
        L[..., 3] = L[..., 4:].amin(-1) if shape[-1] > 4 else L[..., 3]
    return L.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_fused_matches_robust_weights(spec, dtype) -> None:
    assert fused_supported(spec)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for shape, ties in (((1,), False), ((7,), False), ((300,), True), ((2, 3, 40), True), ((2, 5), False)):
        L = _losses(shape, dtype, seed=shape[-1], ties=ties)
        ref = robust_weights(L, spec)
        out = fused_robust_value(L, spec)
        assert out is not None
        value, p = out
        assert value.dtype == dtype and value.shape == shape[:-1] and p.shape == shape
        scale = L.abs().amax().item() + 1.0
        torch.testing.assert_close(value, ref.aux.value, rtol=0, atol=rtol * scale)
        # the weights: identical algorithm; the root-finds agree to their tolerance
        torch.testing.assert_close(p, ref.solution, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-5)
        pd = p.double()
        assert (pd >= 0).all()
        torch.testing.assert_close(pd.sum(-1), torch.ones(shape[:-1], dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", [CVaR(0.3), ChiSquareBall(1.0), KLBall(0.5), KLPenalty(0.7),
                                  CressieRead(3.0, rho=0.5), CressieRead(1.5, lam=1.0),
                                  Spectral(esrm(1.0), lam=0.1), HolisticRobust(0.1, 0.2)], ids=repr)
def test_dro_loss_fast_path_gradient_and_gradcheck(spec) -> None:
    L = _losses((2, 9), torch.float64, seed=3).requires_grad_(True)
    loss = DROLoss(spec)
    out = loss(L)
    out.sum().backward()
    ref = robust_weights(L.detach(), spec)
    torch.testing.assert_close(L.grad, ref.solution, rtol=0, atol=1e-12)
    x0 = L.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: DROLoss(spec, warm_start=False)(x), (x0,))


@pytest.mark.parametrize("spec", [KLBall(0.5), CressieRead(3.0, rho=0.5), CressieRead(1.5, lam=1.0),
                                  HolisticRobust(0.05, 0.1)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warm_start_agrees_with_cold_start(spec, dtype) -> None:
    warm, cold = DROLoss(spec), DROLoss(spec, warm_start=False)
    L = _losses((500,), torch.float64, seed=1)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):  # a drifting sequence of batches, as in training
        L = (L * (1.0 + 0.05 * torch.randn(L.shape, generator=gen, dtype=torch.float64))).abs()
        x = L.to(dtype)
        vw, vc = warm(x), cold(x)
        ref = robust_weights(x, spec)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert abs(float(vw) - float(vc)) <= tol * 4.0
        assert abs(float(vw) - float(ref.aux.value)) <= tol * 4.0
        if step > 0:
            assert math.isfinite(float(np.ravel(warm._warm["x"])[0]))  # the state is being carried
    assert cold._warm == {}
    # a new batch shape drops the old root
    warm(_losses((3, 20), dtype, seed=5))
    assert warm._warm["key"] == ((3,), 20)


def test_fallbacks_to_robust_weights() -> None:
    L = _losses((50,), torch.float64, seed=0)
    assert fused_robust_value(L, CVaR(0.1, smoothing=0.5)) is None  # not covered
    assert fused_robust_value(L, CVaR(0.1), backend="reference") is None
    assert fused_robust_value(L, ChiSquareBall(1.0, lam=0.5)) is None
    assert fused_robust_value(_losses((100, 5), torch.float64, seed=0), CVaR(0.5)) is None  # many rows
    with mock.patch.dict(os.environ, {"OPTLAYERS_KERNELS": "reference"}):
        assert fused_robust_value(L, CVaR(0.1)) is None
    bad = L.clone()
    bad[3] = math.nan
    assert fused_robust_value(bad, KLBall(0.5)) is None
    with pytest.raises(ConvergenceError):
        DROLoss(KLBall(0.5))(bad)  # the front end reports it, as before
    # a root-find that cannot converge in the budget falls back and raises there
    with pytest.raises(ConvergenceError):
        DROLoss(KLBall(0.5), max_iter=1, tol=1e-15)(L)
    # the reference backend gives the same value
    torch.testing.assert_close(DROLoss(KLBall(0.5), backend="reference")(L), DROLoss(KLBall(0.5))(L),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_float32_read_in_place_matches_float64_route(spec) -> None:
    # float32 losses go to the kernel without a dtype round trip: the same float64 computation as
    # for the losses converted to float64 (same tol), so the weights and value are that result
    # rounded to float32 (ties excluded: the two dtypes sort by different routines)
    L = _losses((2, 257), torch.float32, seed=11)
    out32 = fused_robust_value(L, spec, tol=1e-9)
    out64 = fused_robust_value(L.double(), spec, tol=1e-9)
    assert out32 is not None and out64 is not None
    assert out32[1].dtype == torch.float32 and out32[0].dtype == torch.float32
    torch.testing.assert_close(out32[1], out64[1].float(), rtol=0, atol=0)
    torch.testing.assert_close(out32[0], out64[0].float(), rtol=0, atol=0)


def test_desc_order_f32_sorts_descending_with_ties_in_index_order() -> None:
    import numpy as np

    from optlayers.kernels.dro_spectral_fused import desc_keys_f32, desc_order_f32

    gen = np.random.default_rng(0)
    a = gen.standard_normal((3, 500)).astype(np.float32)
    a[0, :40] = 0.0
    a[0, 40:60] = -0.0
    a[1, ::7] = a[1, 3]
    a[2] = np.round(a[2], 1)
    a[2, :5] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, -1e-45]
    order = desc_order_f32(np.ascontiguousarray(a))
    keys = desc_keys_f32(np.ascontiguousarray(a))  # what the spectral kernel reads: the order in the low bits
    np.testing.assert_array_equal((keys & np.uint64(0xFFFFFFFF)).astype(np.intp), order)
    for b in range(3):
        assert sorted(order[b].tolist()) == list(range(500))  # a permutation
        s = a[b][order[b]]
        assert (s[:-1] >= s[1:]).all()
        ref = np.argsort(-a[b], kind="stable")  # ties in index order (+0 and -0 compare equal)
        np.testing.assert_array_equal(s, a[b][ref])


@pytest.mark.kernels
def test_radix_order_equals_the_key_sort() -> None:
    """The in-kernel radix sort gives exactly the order of the packed-key NumPy sort for float32
    rows, and the exact descending order (ties in index order, +0 before -0) for float64 rows,
    whose float32-rounded keys tie far more often (ties, ±0, extremes, subnormals, infinities,
    values equal in float32 but not in float64, several lengths)."""
    import numpy as np

    from optlayers.kernels.dro_spectral_fused import desc_order_f32, desc_order_radix, desc_sorted_radix

    gen = np.random.default_rng(1)
    for n in (1, 2, 7, 500, 4096):
        a = gen.standard_normal((5, n))
        a[0, : n // 2] = 0.0
        a[0, n // 2: (3 * n) // 4] = -0.0
        a[1, ::3] = a[1, 0]
        a[2] = np.round(a[2] * 3, 0)
        if n >= 7:
            a[3, :7] = [np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -1e-45, 3.0]
        a[4] = 1.0 + gen.integers(0, 4, n) * 1e-12  # distinct in float64, one float32 value
        for dtype in (np.float32, np.float64):
            rows = np.ascontiguousarray(a.astype(dtype))
            if dtype == np.float32:
                ref = desc_order_f32(rows)
            else:  # value descending, then +0 before -0, then index
                ref = np.stack([np.lexsort((np.arange(n), np.signbit(r) & (r == 0), -r)) for r in rows])
            order = np.empty(n, dtype=np.int32)
            work = (np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty((3, 2048), np.int32))
            ls = work[1].view(np.float64)  # the sorted row is decoded over the second key buffer
            for b in range(5):
                desc_order_radix(rows[b], order, *work)
                np.testing.assert_array_equal(order, ref[b])
                order[:] = -1
                work[1][:] = 0
                finite = desc_sorted_radix(rows[b], order, *work)
                np.testing.assert_array_equal(order, ref[b])
                np.testing.assert_array_equal(ls, rows[b][ref[b]].astype(np.float64))  # -0.0 == 0.0 here
                np.testing.assert_array_equal(np.signbit(ls), np.signbit(rows[b][ref[b]]))
                assert finite == bool(np.isfinite(rows[b]).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_path_inputs_and_outputs(dtype) -> None:
    spec = KLBall(0.5)
    base = _losses((6, 4), dtype, seed=4)
    Lt = base.t()  # non-contiguous (4, 6)
    out = fused_robust_value(Lt, spec)
    ref = fused_robust_value(Lt.contiguous(), spec)
    assert out is not None and ref is not None
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    # fresh outputs every call (nothing aliases a reused buffer)
    L = _losses((50,), dtype, seed=6).requires_grad_(True)
    v1, p1 = fused_robust_value(L, CVaR(0.2))  # type: ignore[misc]
    keep_v, keep_p = v1.detach().clone(), p1.clone()
    fused_robust_value(L.detach() * 2.0, CVaR(0.2))
    assert torch.equal(v1.detach(), keep_v) and torch.equal(p1, keep_p)
    # the value: the robust value exactly; gradient p, for one row (built-in ops) and for a batch
    ref1 = robust_weights(L.detach(), CVaR(0.2))
    torch.testing.assert_close(v1.detach(), ref1.aux.value, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    v1.backward()
    torch.testing.assert_close(L.grad, p1, rtol=0, atol=0)
    LB = _losses((3, 50), dtype, seed=7).requires_grad_(True)
    vB, pB = fused_robust_value(LB, spec)  # type: ignore[misc]
    vB.sum().backward()
    torch.testing.assert_close(LB.grad, pB, rtol=0, atol=0)
    # without gradient, non-finite float32 / float64 entries fall back
    assert fused_robust_value(L.detach(), spec)[0].grad_fn is None  # type: ignore[index]
    for kind in (spec, CVaR(0.2), Spectral(esrm(1.0), lam=0.1)):
        bad = L.detach().clone()
        bad[7] = math.inf
        assert fused_robust_value(bad, kind) is None


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_runner_matches_fused_robust_value(spec) -> None:
    # the prepared per-signature runner of DROLoss gives fused_robust_value's result
    for dtype in (torch.float32, torch.float64):
        for shape in ((300,), (2, 3, 40)):
            L = _losses(shape, dtype, seed=shape[-1], ties=True).requires_grad_()
            run = FusedRunner.create(spec, L, tol=None, max_iter=100, backend=None, state=None)
            assert run is not None and run.matches(L)
            assert not run.matches(L.detach()[..., 1:]) and not run.matches(L.detach().double().float().half())
            out = fused_robust_value(L, spec)
            assert out is not None
            value = run(L)
            assert value is not None
            # one row: the value is <l, p> - penalty in the losses' dtype (the kernel's float64
            # value rounded differently); several rows: the kernel's value itself
            tol = 0.0 if len(shape) > 1 else (1e-14 if dtype == torch.float64 else 1e-6) * 4.0
            torch.testing.assert_close(value, out[0], rtol=0, atol=tol)
            (g,) = torch.autograd.grad(value.sum(), L)
            torch.testing.assert_close(g, out[1], rtol=0, atol=0)


def test_runner_declines_like_fused_robust_value() -> None:
    L = _losses((50,), torch.float64, seed=0)
    kw = {"tol": None, "max_iter": 100, "backend": None, "state": None}
    assert FusedRunner.create(CVaR(0.1, smoothing=0.5), L, **kw) is None
    assert FusedRunner.create(CVaR(0.1), L, **{**kw, "backend": "reference"}) is None
    assert FusedRunner.create(CVaR(0.5), _losses((100, 5), torch.float64, seed=0), **kw) is None
    run = FusedRunner.create(KLBall(0.5), L, **kw)
    assert run is not None
    with mock.patch.dict(os.environ, {"OPTLAYERS_KERNELS": "reference"}):
        assert run(L) is None  # a backend forced after the runner was made
    bad = L.clone()
    bad[3] = math.nan
    assert run(bad) is None
    assert FusedRunner.create(KLBall(0.5), L, **{**kw, "max_iter": 1, "tol": 1e-15})(L) is None
    # DROLoss makes a new runner when the batch shape or the spec changes
    loss = DROLoss(CVaR(0.5))
    loss(L)
    first = loss._runner
    loss(L[:20])
    assert loss._runner is not first and loss._runner.shape == (20,)
    loss.spec = CVaR(0.25)
    torch.testing.assert_close(loss(L), robust_weights(L, CVaR(0.25)).aux.value, rtol=0, atol=1e-12)


def test_chi2_ball_iteration_matches_the_sorted_scan() -> None:
    import numpy as np

    from optlayers.kernels.dro_fused import chi2_ball_iterate_row, fused_chi2_ball_row

    rng = np.random.default_rng(0)
    rows = [rng.random(4096) * 3, rng.standard_normal(300) ** 2, rng.random(7), np.round(rng.random(500), 1),
            1.0 + 1e-3 * rng.random(200), np.r_[np.full(50, 2.0), rng.random(10)]]  # near-constant; tied maxima
    for row in rows:
        for rho in (1e-4, 0.05, 1.0, 5.0):
            p_scan = np.empty_like(row)
            v_scan, _, _ = fused_chi2_ball_row(row, -np.sort(-row), rho, p_scan)
            for passes in (64, 0):  # the iteration, and the scan it falls back to
                p_it = np.empty_like(row)
                v_it = chi2_ball_iterate_row(row, rho, p_it, passes)
                np.testing.assert_allclose(p_it, p_scan, rtol=0, atol=1e-12 / row.std() if passes else 0.0)
                assert abs(v_it - v_scan) <= 1e-12 * (1.0 + abs(v_scan))

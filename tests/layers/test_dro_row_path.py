"""The one-row, by-address fast path of ``DROLoss`` and the DRO losses under ``torch.func``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import forward_ad

from optlayers import ConvergenceError, Status
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
)
from optlayers.solvers.dro.fused import FusedRunner, _danskin_dot

pytest.importorskip("numba")

SPECS = [
    CVaR(0.1), TotalVariation(0.1), ChiSquareBall(1.0), ChiSquarePenalty(1.0), KLBall(0.5), KLPenalty(1.0),
    CressieRead(3.0, rho=0.5), CressieRead(1.5, lam=1.0), Spectral(esrm(1.0), lam=0.1),
    Spectral(extremile(2.0), lam=0.1, divergence="kl"), Spectral(extremile(2.0), lam=0.004, divergence="kl"),
    HolisticRobust(0.05, 0.1),
]
PENALIZED = (ChiSquarePenalty, KLPenalty, Spectral)


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTLAYERS_KERNELS", raising=False)


def _losses(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    L = torch.rand(n, generator=gen, dtype=torch.float64) * 3.0
    L[:3] = L.max()  # tied maxima
    return L.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_row_path_equals_the_batch_drivers(spec, dtype) -> None:
    # the same row through the by-address entry (a 1-D contiguous vector) and through the NumPy
    # route of the batch drivers (the same vector as a (1, n) batch): identical weights, and the
    # value is the kernel's value (penalized specs) or <l, p> (balls)
    for n in (1, 7, 300):
        L = _losses(n, dtype, seed=n).requires_grad_()
        run = FusedRunner.create(spec, L, tol=None, max_iter=100, backend=None, state=None)
        assert run is not None
        assert run.row is not None
        value = run(L)
        (p_row,) = torch.autograd.grad(value, L)
        L2 = L.detach().reshape(1, n).requires_grad_()
        batch = FusedRunner.create(spec, L2, tol=None, max_iter=100, backend=None, state=None)
        assert batch is not None and batch.row is None
        out = batch.solve(L2)
        assert out is not None
        P, V, _ = out
        torch.testing.assert_close(p_row, torch.from_numpy(P[0]), rtol=0, atol=0)
        v = float(value.detach())
        if isinstance(spec, PENALIZED) or (isinstance(spec, CressieRead) and spec.lam is not None):
            assert v == float(V[0])
        else:
            assert v == float(torch.dot(L.detach(), torch.from_numpy(P[0])))
        ref = robust_weights(L.detach().double(), spec)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert abs(v - float(ref.aux.value)) <= 4 * tol * (1.0 + abs(float(ref.aux.value)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overwritten_value_flows_downstream(dtype) -> None:
    # d(R²)/dl = 2 R p: the graph after the loss sees the robust value R, not <l, p>
    spec = Spectral(extremile(2.0), lam=0.1, divergence="kl")
    L = _losses(500, dtype, seed=0).requires_grad_()
    loss = DROLoss(spec)
    value = loss(L)
    assert loss._runner is not None  # the row path (float32) or the array route (float64)
    (g,) = torch.autograd.grad(value**2, L)
    ref = robust_weights(L.detach().double(), spec)
    R, p = float(ref.aux.value), ref.solution
    assert abs(float(value.detach()) - float(torch.dot(L.detach().double(), p))) > 1e-3  # a sizeable penalty
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(g.double(), 2.0 * R * p, rtol=tol, atol=tol * float(p.max()))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_row_path_gradcheck(spec) -> None:
    # finite differences of the returned value against its gradient p: for a penalized spec this
    # checks that the overwritten value is the robust value (d<l, p(l)>/dl is not p)
    L = _losses(9, torch.float64, seed=5)
    L[:3] += torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)  # no ties: a smooth point
    loss = DROLoss(spec, warm_start=False)
    x0 = L.clone().requires_grad_()
    loss(x0)
    assert loss._runner is not None and loss._runner.row is not None
    assert torch.autograd.gradcheck(loss, (x0,))


def test_danskin_dot() -> None:
    L = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    p = torch.tensor([0.25, 0.25, 0.5])
    v = _danskin_dot(L, p, 1.5)
    assert v.shape == () and v.item() == 1.5
    (g,) = torch.autograd.grad(v, L)
    assert g.tolist() == p.tolist()
    assert _danskin_dot(L, p, None).item() == 2.75  # no value given: the dot itself
    # a dtype with no C scalar type (bfloat16, as under autocast): the value by tensor ops
    Lb, pb = L.detach().bfloat16().requires_grad_(), p.bfloat16()
    vb = _danskin_dot(Lb, pb, 1.5)
    assert vb.item() == 1.5 and torch.autograd.grad(vb, Lb)[0].tolist() == pb.tolist()


def test_strided_vector_takes_the_array_route() -> None:
    spec = Spectral(esrm(1.0), lam=0.1)
    base = _losses(600, torch.float32, seed=3)
    L = base[::2].requires_grad_()  # not contiguous
    loss = DROLoss(spec)
    v = loss(L)
    (g,) = torch.autograd.grad(v, L)
    Lc = L.detach().contiguous().requires_grad_()
    vc = DROLoss(spec)(Lc)
    (gc,) = torch.autograd.grad(vc, Lc)
    torch.testing.assert_close(g, gc, rtol=0, atol=0)
    assert abs(v.item() - vc.item()) <= 1e-6 * abs(vc.item())


def test_root_row_path_warm_start_state() -> None:
    loss = DROLoss(KLBall(0.5))
    L = _losses(400, torch.float64, seed=1)
    loss(L)
    assert loss._warm["key"] == ("row", 400) and math.isfinite(loss._warm["x"])
    cold = DROLoss(KLBall(0.5), warm_start=False)
    for s in range(3):
        Ls = (L * (1.0 + 0.02 * s)).requires_grad_()
        assert abs(loss(Ls).item() - cold(Ls).item()) <= 4e-12
    assert cold._warm == {}


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_torch_func_and_forward_mode(spec) -> None:
    # the fast path declines under transforms; the reference path gives the Danskin gradient p
    n = 257  # a size no other test uses: the spectrum cache is first filled under a transform
    loss = DROLoss(spec)
    L = _losses(n, torch.float64, seed=4)
    p = robust_weights(L, spec).solution
    for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(loss)(L), p, rtol=0, atol=1e-12)
    t = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with forward_ad.dual_level():
        out = loss(forward_ad.make_dual(L, t))
        tangent = forward_ad.unpack_dual(out).tangent
    assert tangent is not None
    assert abs(float(tangent) - float(p @ t)) <= 1e-12
    # and outside the transforms the fast path (and the spectrum cache) work as before
    Lg = L.clone().requires_grad_()
    v = loss(Lg)
    assert loss._runner is not None
    torch.testing.assert_close(torch.autograd.grad(v, Lg)[0], p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", [CVaR(0.2), KLBall(0.5), Spectral(extremile(2.0), lam=0.1, divergence="kl"),
                                  CressieRead(1.5, lam=1.0)], ids=repr)
def test_vmap(spec) -> None:
    # vmap batches the solve by a rule (the vmapped dimension becomes leading rows): the same
    # values, weights and per-example Danskin gradients as the batched call
    L = torch.stack([_losses(60, torch.float64, seed=s) for s in range(4)])  # (4, 60)
    loss = DROLoss(spec)
    ref = robust_weights(L, spec)
    torch.testing.assert_close(torch.func.vmap(loss)(L), ref.aux.value, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(loss, in_dims=1)(L.T.contiguous()), ref.aux.value, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(L), ref.solution, rtol=0, atol=1e-12)
    weights = torch.func.vmap(lambda row: robust_weights(row, spec).solution)(L)
    torch.testing.assert_close(weights, ref.solution, rtol=0, atol=0)
    # nested: a vmapped batch of batches
    L3 = L.reshape(2, 2, 60)
    torch.testing.assert_close(torch.func.vmap(torch.func.vmap(loss))(L3), ref.aux.value.reshape(2, 2), rtol=0,
                               atol=1e-12)


def test_vmap_reports_a_failed_row() -> None:
    L = torch.stack([_losses(30, torch.float64, seed=s) for s in range(3)])
    L[1, 4] = math.nan
    with pytest.raises(ConvergenceError, match="NONFINITE"):
        torch.func.vmap(DROLoss(KLBall(0.5)))(L)
    status = torch.func.vmap(lambda row: robust_weights(row, KLBall(0.5), throw=False).status)(L)
    assert status.tolist() == [0, int(Status.NONFINITE), 0]


def test_row_entries_by_address() -> None:
    # the kernels themselves: a float32 and a float64 row read and written through data pointers
    from optlayers.kernels.dro_fused import CLOSED_KINDS, ROOT_KINDS, fused_root_batch
    from optlayers.kernels.dro_fused_row import closed_row_at, root_row_at

    for dtype in (torch.float32, torch.float64):
        L = _losses(50, dtype, seed=7)
        p = torch.empty(50, dtype=dtype)
        ok, value, pen = closed_row_at(CLOSED_KINDS["cvar"], dtype == torch.float32, L.data_ptr(), p.data_ptr(), 50,
                                       0.1, 5.0, 0.0)
        top = L.double().topk(5).values.mean()
        assert ok and pen == 0.0 and abs(value - float(top)) <= 1e-15 * 3
        assert float(p.sum()) == pytest.approx(1.0) and int((p > 0).sum()) == 5
        status, value, pen, x = root_row_at(ROOT_KINDS["kl_ball"], dtype == torch.float32, L.data_ptr(),
                                            p.data_ptr(), 50, 0.5, 0.0, 1e-12, 100, math.nan)
        A = L.numpy().reshape(1, 50)
        P, V, D, X = np.empty_like(A), np.empty(1), np.empty(1), np.full(1, np.nan)
        assert fused_root_batch(ROOT_KINDS["kl_ball"], A, 0.5, 0.0, 1e-12, 100, X, P, V, D) == status == 0
        assert value == V[0] and x == X[0] and np.array_equal(p.numpy(), P[0])
        bad = L.clone()
        bad[4] = math.inf
        ok, _, _ = closed_row_at(CLOSED_KINDS["chi2_penalty"], dtype == torch.float32, bad.data_ptr(), p.data_ptr(),
                                 50, 1.0, 0.0, 0.0)
        assert not ok

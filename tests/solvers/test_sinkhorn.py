"""Forward behaviour of log-domain Sinkhorn: marginals, oracles, batching, options, failures."""

import math

import numpy as np
import pytest
import torch

from optlayers._result import ConvergenceError, Status
from optlayers.kernels.softmin_reference import (
    CallableSource,
    DenseSource,
    PNormSource,
    SqEuclideanSource,
    kernel_apply_fast,
    kernel_apply_reference,
    softmin_fast,
    softmin_reference,
)
from optlayers.solvers.ot import (
    AndersonAcceleration,
    Anneal,
    CostMatrix,
    CustomCost,
    PNorm,
    PointCloud,
    emd,
    sinkhorn,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see tests/conftest.py


f64 = torch.float64


def clouds(n=40, m=30, d=2, dtype=f64, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=g, dtype=dtype)
    y = 0.5 + 0.15 * torch.randn(*batch, m, d, generator=g, dtype=dtype)
    return x, y


def l1_marginal_error(res, a, b):
    P = res.aux.plan.to_dense()
    return float((P.sum(-1) - a).abs().sum() + (P.sum(-2) - b).abs().sum())


# ------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_softmin_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    B, n, m, d = 2, 37, 23, 3
    x = torch.randn(B, n, d, generator=g, dtype=dtype)
    y = torch.randn(B, m, d, generator=g, dtype=dtype)
    C = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    h = torch.randn(B, m, generator=g, dtype=dtype)
    h[0, 2] = -math.inf
    eps = torch.tensor([0.1, 0.7], dtype=dtype)
    tol = 1e-10 if dtype == f64 else 2e-5
    for src in [DenseSource(C), SqEuclideanSource(x, y, 0.5), PNormSource(x, y, 1.0), PNormSource(x, y, 1.5, 0.3),
                CallableSource(x, y, torch.cdist)]:
        r = softmin_reference(src, h, eps, block_elements=300)
        f = softmin_fast(src, h, eps, block_elements=300)
        assert torch.allclose(r, f, atol=tol * 10, rtol=tol), type(src).__name__
        al = torch.randn(B, n, generator=g, dtype=dtype)
        v = torch.randn(B, m, 2, generator=g, dtype=dtype)
        k1 = kernel_apply_reference(src, al, h / eps[:, None], eps, v)
        k2 = kernel_apply_fast(src, al, h / eps[:, None], eps, v, block_elements=200)
        assert torch.allclose(k1, k2, rtol=tol * 10, atol=tol * float(k1.abs().max()))


# ------------------------------------------------------------------------------ marginals / oracles
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("online", [False, True])
def test_marginal_error_at_convergence(dtype, tol, online):
    x, y = clouds(dtype=dtype)
    res = sinkhorn(None, None, PointCloud(x, y, online=online), epsilon=0.01)
    assert bool(res.converged)
    a = torch.full((40,), 1 / 40, dtype=dtype)
    b = torch.full((30,), 1 / 30, dtype=dtype)
    assert float(res.residual) <= tol
    assert l1_marginal_error(res, a, b) <= tol * 1.01


def test_matches_pot_sinkhorn_log():
    ot = pytest.importorskip("ot")
    x, y = clouds()
    C = torch.cdist(x, y) ** 2
    a = torch.rand(40, dtype=f64) + 0.1
    a = a / a.sum()
    b = torch.rand(30, dtype=f64) + 0.1
    b = b / b.sum()
    res = sinkhorn(a, b, C, epsilon=0.02, tol=1e-11)
    P_pot = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), 0.02, method="sinkhorn_log", stopThr=1e-13,
                        numItermax=100000)
    assert np.abs(res.aux.plan.to_dense().numpy() - P_pot).max() < 1e-9
    # value is the dual objective = primal <C,P> + eps KL(P|ab)
    P = res.aux.plan.to_dense()
    primal = (C * P).sum() + 0.02 * (P * torch.log(P / (a[:, None] * b[None]))).sum()
    assert abs(float(res.aux.value - primal)) < 1e-9
    assert abs(float(res.aux.transport_cost - (C * P).sum())) < 1e-12


def test_transport_cost_decreases_to_emd():
    x, y = clouds(n=20, m=20, seed=3)
    C = torch.cdist(x, y) ** 2
    exact = float(emd(None, None, C).aux.value)
    costs = []
    for eps in [0.1, 0.03, 0.01, 0.003, 0.001]:
        res = sinkhorn(None, None, C, epsilon=eps, anneal=Anneal(), acceleration=AndersonAcceleration())
        costs.append(float(res.aux.transport_cost))
    assert all(c1 > c2 for c1, c2 in zip(costs, costs[1:], strict=False))
    assert costs[-1] - exact < 0.02 * exact
    assert costs[-1] >= exact - 1e-9


def test_permutation_recovered_at_small_epsilon():
    g = torch.Generator().manual_seed(0)
    n = 12
    perm = torch.randperm(n, generator=g)
    pos = torch.arange(n, dtype=f64)
    C = (pos[:, None] - pos[perm][None, :]) ** 2  # zero exactly on j with perm[j] = i
    res = sinkhorn(None, None, C, epsilon=2e-3, relative_epsilon=True, anneal=Anneal(),
                   acceleration=AndersonAcceleration())
    P = res.aux.plan.to_dense()
    assigned = P.argmax(-1)
    assert torch.equal(perm[assigned], torch.arange(n))
    assert float((P * n - torch.eye(n, dtype=f64)[:, perm]).abs().max()) < 1e-3


def test_unbalanced_matches_pot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(2)
    C = torch.rand(9, 7, generator=g, dtype=f64)
    a = torch.rand(9, generator=g, dtype=f64)
    b = torch.rand(7, generator=g, dtype=f64) * 2
    res = sinkhorn(a, b, C, epsilon=0.1, rho_a=1.0, rho_b=0.3, tol=1e-12)
    P_pot = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), 0.1, (1.0, 0.3), method="sinkhorn",
                                              stopThr=1e-15, numItermax=100000, reg_type="kl")
    assert np.abs(res.aux.plan.to_dense().numpy() - P_pot).max() < 1e-9
    # semi-unbalanced: hard constraint on b
    res = sinkhorn(a, b / b.sum() * 0.7, C, epsilon=0.1, rho_a=0.5, tol=1e-10)
    assert torch.allclose(res.aux.plan.to_dense().sum(0), b / b.sum() * 0.7, atol=1e-9)


# ------------------------------------------------------------------------------ geometry / batching
def test_online_dense_and_custom_agree():
    x, y = clouds(n=50, m=35)
    dense = sinkhorn(None, None, PointCloud(x, y, online=False), epsilon=0.02)
    online = sinkhorn(None, None, PointCloud(x, y, online=True, block_elements=256), epsilon=0.02)
    matrix = sinkhorn(None, None, CostMatrix(torch.cdist(x, y) ** 2), epsilon=0.02)
    custom = sinkhorn(None, None, PointCloud(x, y, CustomCost(lambda u, v: torch.cdist(u, v) ** 2), online=True),
                      epsilon=0.02)
    for other in (online, matrix, custom):
        assert torch.allclose(dense.solution[0], other.solution[0], atol=1e-10)
        assert torch.allclose(dense.aux.value, other.aux.value, atol=1e-12)
    p1 = sinkhorn(None, None, PointCloud(x, y, PNorm(1.0), online=True), epsilon=0.02)
    p1d = sinkhorn(None, None, torch.cdist(x, y), epsilon=0.02)
    assert torch.allclose(p1.aux.value, p1d.aux.value, atol=1e-10)


def test_batch_equals_loop_and_masks():
    x, y = clouds(n=20, m=15, batch=(3,))
    eps = torch.tensor([0.05, 0.1, 0.02], dtype=f64)
    batched = sinkhorn(None, None, PointCloud(x, y), epsilon=eps)
    for i in range(3):
        single = sinkhorn(None, None, PointCloud(x[i], y[i]), epsilon=float(eps[i]))
        assert torch.allclose(batched.aux.value[i], single.aux.value, atol=1e-12)
        assert torch.allclose(batched.solution[1][i], single.solution[1], atol=1e-9)
        assert int(batched.iterations[i]) == int(single.iterations)
    # ragged sizes through padding masks
    mask_a = torch.ones(3, 20, dtype=torch.bool)
    mask_a[1, 12:] = False
    mask_b = torch.ones(3, 15, dtype=torch.bool)
    mask_b[2, 9:] = False
    padded = sinkhorn(None, None, PointCloud(x, y), epsilon=0.05, mask_a=mask_a, mask_b=mask_b)
    s1 = sinkhorn(None, None, PointCloud(x[1, :12], y[1]), epsilon=0.05)
    s2 = sinkhorn(None, None, PointCloud(x[2], y[2, :9]), epsilon=0.05)
    assert torch.allclose(padded.aux.value[1], s1.aux.value, atol=1e-12)
    assert torch.allclose(padded.aux.value[2], s2.aux.value, atol=1e-12)
    P = padded.aux.plan.to_dense()
    assert float(P[1, 12:].abs().max()) == 0.0 and float(P[2, :, 9:].abs().max()) == 0.0


def test_vmap_matches_loop():
    x, y = clouds(n=12, m=10, batch=(4,))

    def value(x, y):
        return sinkhorn(None, None, PointCloud(x, y), epsilon=0.05).aux.value

    vm = torch.func.vmap(value)(x, y)
    loop = torch.stack([value(x[i], y[i]) for i in range(4)])
    assert torch.allclose(vm, loop, atol=1e-12)


# ------------------------------------------------------------------------------ options
def test_annealing_stages_each_converge_and_anderson():
    x, y = clouds(n=60, m=50, seed=4)
    geom = PointCloud(x, y)
    plain = sinkhorn(None, None, geom, epsilon=0.003, max_iter=20000)
    trace = []
    annealed = sinkhorn(None, None, geom, epsilon=0.003, anneal=Anneal(decay=0.5, stage_tol=1e-3),
                        callback=lambda k, r: trace.append(float(r)))
    assert bool(annealed.converged)
    assert torch.allclose(plain.aux.value, annealed.aux.value, atol=1e-8)
    fast = sinkhorn(None, None, geom, epsilon=0.003, acceleration=AndersonAcceleration())
    assert torch.allclose(plain.aux.value, fast.aux.value, atol=1e-8)
    assert int(fast.iterations) < int(plain.iterations)
    # a stage ends only when its own error is below the stage tolerance: the error jumps up at
    # each change of epsilon, and is below 1e-3 right before each jump
    jumps = [i for i in range(1, len(trace)) if trace[i] > 10 * trace[i - 1]]
    assert len(jumps) >= 3
    assert all(trace[i - 1] <= 1e-3 for i in jumps)


def test_warm_start_and_relative_epsilon():
    x, y = clouds(n=30, m=25)
    geom = PointCloud(x, y)
    cold = sinkhorn(None, None, geom, epsilon=0.01)
    warm = sinkhorn(None, None, geom, epsilon=0.01, init=cold.solution)
    assert int(warm.iterations) <= 2
    warm_g = sinkhorn(None, None, geom, epsilon=0.01, init=(None, cold.solution[1]))
    assert int(warm_g.iterations) <= 2
    rel = sinkhorn(None, None, geom, epsilon=0.05, relative_epsilon=True)
    mean_cost = (torch.cdist(x, y) ** 2).mean()
    assert torch.allclose(rel.aux.epsilon, 0.05 * mean_cost)


# ------------------------------------------------------------------------------ failures / numerics
def test_failures_are_reported():
    x, y = clouds(n=20, m=20)
    with pytest.raises(ConvergenceError, match="sinkhorn failed with status MAX_ITER.*max_iter=1"):
        sinkhorn(None, None, PointCloud(x, y), epsilon=0.01, max_iter=1)
    res = sinkhorn(None, None, PointCloud(x, y), epsilon=0.01, max_iter=1, throw=False)
    assert not bool(res.converged) and int(res.status) == Status.MAX_ITER
    xb = torch.stack([x, x])
    xb[1, 3, 0] = math.nan
    res = sinkhorn(None, None, PointCloud(xb, torch.stack([y, y])), epsilon=0.05, throw=False)
    assert res.converged.tolist() == [True, False]
    assert res.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    with pytest.raises(ValueError, match="sum\\(a\\) == sum\\(b\\)"):
        sinkhorn(torch.ones(20, dtype=f64), None, PointCloud(x, y), epsilon=0.1)
    with pytest.raises(ValueError, match="unknown gradient"):
        sinkhorn(None, None, PointCloud(x, y), epsilon=0.1, gradient="magic")


def test_degenerate_inputs_give_no_nan():
    x, y = clouds(n=10, m=8)
    a = torch.full((10,), 0.125, dtype=f64)
    a[[1, 4]] = 0.0
    res = sinkhorn(a, None, PointCloud(x, y), epsilon=0.05)
    assert torch.isfinite(res.solution[0]).all() and torch.isfinite(res.aux.value)
    assert float(res.aux.plan.to_dense()[[1, 4]].abs().max()) == 0.0
    one = sinkhorn(None, None, PointCloud(x[:1], y[:1]), epsilon=0.05)
    assert torch.isfinite(one.aux.value)
    assert abs(float(one.aux.transport_cost) - float(((x[0] - y[0]) ** 2).sum())) < 1e-12
    same = sinkhorn(None, None, PointCloud(x, x), epsilon=0.05, relative_epsilon=True, symmetric=True)
    assert torch.isfinite(same.aux.value)
    assert torch.allclose(same.solution[0], same.solution[1])
    dirac = sinkhorn(None, None, PointCloud(torch.zeros(5, 2), torch.zeros(4, 2)), epsilon=0.1, relative_epsilon=True)
    assert torch.isfinite(dirac.aux.value) and float(dirac.aux.transport_cost) == 0.0


def test_float32_small_relative_epsilon_stays_finite():
    x, y = clouds(n=40, m=40, dtype=torch.float32, seed=5)
    C = torch.cdist(x, y) ** 2
    eps = 1e-3 * float(C.median())
    res = sinkhorn(None, None, C, epsilon=eps, anneal=Anneal(), acceleration=AndersonAcceleration(), throw=False)
    assert torch.isfinite(res.solution[0]).all() and torch.isfinite(res.solution[1]).all()
    assert torch.isfinite(res.aux.value) and torch.isfinite(res.aux.transport_cost)
    assert float(res.residual) <= 1e-4


# ------------------------------------------------------------------------------ plan operator
def test_plan_operator():
    x, y = clouds(n=25, m=18, batch=(2,))
    res = sinkhorn(None, None, PointCloud(x, y, online=True, block_elements=100), epsilon=0.05)
    plan = res.aux.plan
    P = plan.to_dense()
    v = torch.randn(2, 18, dtype=f64)
    u = torch.randn(2, 25, 3, dtype=f64)
    assert torch.allclose(plan.matvec(v), (P @ v[..., None])[..., 0], atol=1e-14)
    assert torch.allclose(plan.rmatvec(u), P.transpose(-1, -2) @ u, atol=1e-14)
    assert torch.allclose(plan.T.to_dense(), P.transpose(-1, -2), atol=1e-15)
    assert torch.allclose(plan.T.matvec(u), P.transpose(-1, -2) @ u, atol=1e-14)
    vals, idx = plan.topk(3)
    ref = torch.topk(P, 3, dim=-1)
    assert torch.equal(idx, ref.indices) and torch.allclose(vals, ref.values, atol=1e-15)
    rows, cols = plan.marginals()
    assert torch.allclose(rows, torch.full_like(rows, 1 / 25), atol=1e-6)
    assert plan.shape == (2, 25, 18)


def test_fixed_iteration_mode_matches_checked_loop():
    x, y = clouds(n=20, m=16, batch=(2,))
    fixed = sinkhorn(None, None, PointCloud(x, y), epsilon=0.01, max_iter=30, check_every=None, throw=False)
    checked = sinkhorn(None, None, PointCloud(x, y), epsilon=0.01, max_iter=30, tol=1e-300, throw=False)
    assert fixed.iterations.tolist() == [30, 30]
    assert torch.allclose(fixed.solution[0], checked.solution[0], atol=1e-14)
    assert torch.allclose(fixed.residual, checked.residual)


# ------------------------------------------------------------------------------ dispatch
def _dense_log_sinkhorn(C, a, b, eps, iters):
    """Independent oracle: plain dense log-domain Sinkhorn (no optlayers code)."""
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        g = -eps * torch.logsumexp((f[:, None] - C) / eps + torch.log(a)[:, None], 0)
        f = -eps * torch.logsumexp((g[None, :] - C) / eps + torch.log(b)[None, :], 1)
    return torch.exp((f[:, None] + g[None, :] - C) / eps) * a[:, None] * b[None, :]


@pytest.mark.kernels
@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_runs_through_dispatch(online, dtype):
    """The soft-min and transport-apply run through optlayers.kernels and the forced backend ran."""
    import os

    from optlayers.kernels import Backend, last_backend
    from optlayers.kernels._dispatch import _LAST
    from optlayers.kernels.softmin import KERNEL_APPLY, SOFTMIN

    forced = os.environ.get("OPTLAYERS_KERNELS", "")
    expected = Backend.parse(forced) if forced and forced != "auto" else Backend.REFERENCE
    _LAST.pop(SOFTMIN, None)
    _LAST.pop(KERNEL_APPLY, None)
    x, y = clouds(31, 23, dtype=dtype, seed=4)
    res = sinkhorn(None, None, PointCloud(x, y, online=online), epsilon=0.05)
    assert last_backend(SOFTMIN) is expected
    P = res.aux.plan
    rows = P.matvec(torch.ones(23, dtype=dtype))
    assert last_backend(KERNEL_APPLY) is expected
    a, b = torch.full((31,), 1 / 31, dtype=dtype), torch.full((23,), 1 / 23, dtype=dtype)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert float((rows - a).abs().sum()) <= 2 * tol
    C = ((x[:, None] - y[None]) ** 2).sum(-1).double()
    P_ref = _dense_log_sinkhorn(C, a.double(), b.double(), 0.05, 400)
    assert float((P.to_dense().double() - P_ref).abs().sum()) <= (1e-5 if dtype == torch.float64 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stabilized_kernel_iterates_equal_log_domain(dtype, monkeypatch):
    """Stored costs iterate by matrix-vector products on a stabilized kernel: same iterates as the
    exact log-domain soft-min (forced through the dispatch), including annealing, unbalanced
    marginals, zero weights and a NaN problem in the batch."""
    x, y = clouds(40, 30, dtype=dtype, seed=8, batch=(3,))
    C = ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    C[2, 0, 0] = math.nan  # one failing problem must not disturb the others
    a = torch.rand(3, 40, dtype=dtype) + 0.1
    a[:, :3] = 0.0
    a = a / a.sum(-1, keepdim=True)
    b = torch.full((3, 30), 1 / 30, dtype=dtype)
    cases = [dict(epsilon=0.01), dict(epsilon=0.003, anneal=Anneal()), dict(epsilon=0.02, rho_a=0.5, rho_b=1.0)]
    for kw in cases:
        monkeypatch.delenv("OPTLAYERS_KERNELS", raising=False)
        fast = sinkhorn(a, b, CostMatrix(C), throw=False, max_iter=5000, **kw)
        monkeypatch.setenv("OPTLAYERS_KERNELS", "reference")
        exact = sinkhorn(a, b, CostMatrix(C), throw=False, max_iter=5000, **kw)
        assert fast.status.tolist() == exact.status.tolist()
        assert fast.status[2] == Status.NONFINITE and bool(fast.converged[:2].all())
        # identical up to roundoff, iteration by iteration (the counts agree within one check)
        assert (fast.iterations[:2] - exact.iterations[:2]).abs().max() <= 1
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        for u, v in zip(fast.solution, exact.solution):
            torch.testing.assert_close(u[:2], v[:2], rtol=0, atol=tol * (1 + float(v[:2].abs().max())))

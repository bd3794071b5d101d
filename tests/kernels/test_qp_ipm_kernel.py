"""The compiled interior point (kernel ``qp.interior_point``) against its PyTorch specification."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import optlayers.kernels._dispatch as D
from optlayers import Status
from optlayers.kernels import Backend, KernelUnavailableError, call_count, last_backend
from optlayers.kernels.qp_ipm import KERNEL_NAME
from optlayers.layers.qp import qp
from optlayers.solvers.qp import InteriorPoint

HAS_NUMBA = D.backend_available(Backend.NUMBA)
pytestmark = [pytest.mark.kernels, pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ENV_VAR, raising=False)


def random_qp(B: int, n: int, m: int, k: int, dtype: torch.dtype, seed: int, *, shared: str = "",
              psd_rank: int | None = None) -> tuple[torch.Tensor, ...]:
    """Feasible random QP data; names in ``shared`` (e.g. ``"QG"``) are given without batch dimension."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=f64)

    r = n if psd_rank is None else psd_rank
    Lf = rnd(B, n, r) / n ** 0.5
    Q = Lf @ Lf.mT + (0.1 * torch.eye(n, dtype=f64) if psd_rank is None else 0.0)
    p, G, A = rnd(B, n), rnd(B, m, n), rnd(B, k, n)
    if "G" in shared:
        G = G[:1].expand(B, m, n)
    if "A" in shared:
        A = A[:1].expand(B, k, n)
    x0 = rnd(1 if "h" in shared and "b" in shared else B, n)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=f64)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    out = dict(Q=Q, p=p, G=G, h=h, A=A, b=b)
    for name in shared:
        out[name] = out[name][0].contiguous()
    return tuple(out[c].to(dtype) for c in ("Q", "p", "G", "h", "A", "b"))


def both(data: tuple[torch.Tensor | None, ...], cfg: InteriorPoint | None = None, **kw: object):
    """Solve with the compiled kernel (forced) and the PyTorch loop (forced)."""
    cfg = cfg if cfg is not None else InteriorPoint()
    before = call_count(KERNEL_NAME, "numba")
    rk = dataclasses.replace(cfg, backend="numba").run(*data, **kw)
    assert call_count(KERNEL_NAME, "numba") == before + 1
    assert last_backend(KERNEL_NAME) is Backend.NUMBA
    rr = dataclasses.replace(cfg, backend="reference").run(*data, **kw)
    assert call_count(KERNEL_NAME, "numba") == before + 1  # the reference ran the PyTorch loop
    return rk, rr


def assert_same(rk, rr, *, iters_tol: int = 0, atol: float = 1e-10) -> None:
    assert torch.equal(rk.status, rr.status)
    assert int((rk.iterations - rr.iterations).abs().max()) <= iters_tol
    ok = rk.status == int(Status.SUCCESS)
    for a, b in ((rk.solution, rr.solution), (rk.aux.ineq_dual, rr.aux.ineq_dual),
                 (rk.aux.eq_dual, rr.aux.eq_dual), (rk.aux.slack, rr.aux.slack)):
        assert torch.isnan(a).equal(torch.isnan(b))
        scale = 1.0 + b[ok].abs().amax() if b[ok].numel() else 1.0
        torch.testing.assert_close(a[ok], b[ok], rtol=0, atol=atol * scale)
    assert bool((rk.residual[ok] <= InteriorPoint().tolerance(rk.solution.dtype)).all())


@pytest.mark.parametrize("B,n,m,k,shared", [
    (6, 12, 15, 3, ""), (5, 20, 8, 0, ""), (4, 10, 0, 4, ""), (3, 8, 0, 0, ""),
    (7, 15, 20, 5, "QG"), (4, 9, 11, 2, "AQ"), (1, 30, 30, 6, ""), (5, 16, 24, 4, "pGhAb"),
])
def test_matches_reference_float64(B: int, n: int, m: int, k: int, shared: str) -> None:
    data = random_qp(B, n, m, k, torch.float64, seed=B * 100 + n, shared=shared)
    rk, rr = both(data)
    assert_same(rk, rr)
    assert bool((rk.status == 0).all())


@pytest.mark.parametrize("B,n,m,k", [(6, 12, 15, 3), (5, 20, 30, 4)])
def test_matches_reference_float32(B: int, n: int, m: int, k: int) -> None:
    # float32 rounding (different summation orders than batched BLAS) can move the stopping test by
    # an iteration; the solutions agree to the float32 accuracy of the method.
    data = random_qp(B, n, m, k, torch.float32, seed=7 + n)
    rk, rr = both(data)
    assert rk.solution.dtype == torch.float32
    assert torch.equal(rk.status, rr.status)
    assert int((rk.iterations - rr.iterations).abs().max()) <= 1
    x64 = InteriorPoint().run(*(t.double() for t in data)).solution
    err_k = float((rk.solution.double() - x64).abs().max())
    err_r = float((rr.solution.double() - x64).abs().max())
    assert err_k <= 10 * err_r + 1e-4 * (1.0 + float(x64.abs().max()))


def test_psd_q_and_lp() -> None:
    # rank-2 PSD Q with constraints pinning the solution down, and an LP (Q = 0) with box constraints
    n = 6
    data = random_qp(4, n, 8, 2, torch.float64, seed=3, psd_rank=2)
    Q, p, G, h, A, b = data
    box_G = torch.cat([torch.eye(n), -torch.eye(n)], 0).double().expand(4, 2 * n, n)
    box_h = torch.ones(4, 2 * n, dtype=torch.float64)
    G, h = torch.cat([G, box_G], -2), torch.cat([h, box_h + 5.0], -1)
    rk, rr = both((Q, p, G, h, A, b))
    assert_same(rk, rr, atol=1e-8)
    lp = (torch.zeros(4, n, n, dtype=torch.float64), p, box_G, box_h, None, None)
    rk, rr = both(lp)
    assert_same(rk, rr, atol=1e-8)
    torch.testing.assert_close(rk.solution, -torch.sign(p), atol=1e-8, rtol=0)


def test_failures_reported_per_element() -> None:
    n = 4
    Q, p, G, h, A, b = random_qp(5, n, 6, 1, torch.float64, seed=11)
    Q, p, G, h = Q.clone(), p.clone(), G.clone(), h.clone()
    # element 1: x₀ ≤ -1 and -x₀ ≤ -1 (x₀ ≥ 1): infeasible
    G[1, :2] = 0.0
    G[1, 0, 0], G[1, 1, 0], h[1, 0], h[1, 1] = 1.0, -1.0, -1.0, -1.0
    # element 2: an LP unbounded below along -e₀ (no constraint stops it)
    Q[2] = 0.0
    p[2] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    G[2], h[2] = 0.0, 1.0
    A[2], b[2] = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64), 0.0
    G[2, :3, 1:] = torch.eye(3, dtype=torch.float64)[:, :3]
    # element 3: NaN data
    p[3, 0] = float("nan")
    rk, rr = both((Q, p, G, h, A, b))
    assert rr.status.tolist()[1:4] == [int(Status.INFEASIBLE), int(Status.UNBOUNDED), int(Status.NONFINITE)]
    assert_same(rk, rr)
    assert bool(torch.isnan(rk.solution[1:4]).all()) and bool(torch.isfinite(rk.solution[[0, 4]]).all())


def test_max_iter_and_warm_start() -> None:
    data = random_qp(6, 15, 20, 3, torch.float64, seed=5)
    rk, rr = both(data, InteriorPoint(max_iter=3))
    assert_same(rk, rr, atol=1e-9)
    assert bool((rk.status == int(Status.MAX_ITER)).all()) and bool((rk.iterations == 3).all())
    cold, _ = both(data)
    # warm start from the solution (primal and duals), from a primal guess and from a tuple
    for init in (cold, cold.solution, (cold.solution, None, cold.aux.ineq_dual)):
        rk, rr = both(data, init=init)
        assert_same(rk, rr)
    rk, _ = both(data, init=cold)
    assert bool((rk.iterations < cold.iterations).all())


def test_automatic_choice_and_forcing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_qp(3, 10, 12, 2, torch.float64, seed=1)
    before = call_count(KERNEL_NAME, "numba")
    auto = InteriorPoint(kkt_form="normal").run(*data)  # CPU, normal form: the compiled solve
    assert call_count(KERNEL_NAME, "numba") == before + 1 and last_backend(KERNEL_NAME) is Backend.NUMBA
    # configurations the kernel does not implement run the PyTorch loop
    seen: list[int] = []
    for cfg in (InteriorPoint(kkt_form="normal", refine=1), InteriorPoint(kkt_form="normal", check_every=None),
                InteriorPoint(kkt_form="normal", callback=lambda it, r: seen.append(it))):
        res = cfg.run(*data)
        torch.testing.assert_close(res.solution, auto.solution, atol=1e-9, rtol=0)
    assert seen and call_count(KERNEL_NAME, "numba") == before + 1
    monkeypatch.setenv(D.ENV_VAR, "reference")
    ref = InteriorPoint(kkt_form="normal").run(*data)
    assert call_count(KERNEL_NAME, "numba") == before + 1
    assert torch.equal(ref.iterations, auto.iterations)
    monkeypatch.setenv(D.ENV_VAR, "numba")
    InteriorPoint(kkt_form="normal").run(*data)
    assert call_count(KERNEL_NAME, "numba") == before + 2
    with pytest.raises(ValueError, match="backend='numba'"):
        InteriorPoint(backend="numba", refine=1)
    with pytest.raises(ValueError, match="backend"):
        InteriorPoint(backend="triton")
    with pytest.raises(KernelUnavailableError):
        InteriorPoint(backend="numba").run(*(t.half() for t in data))


def test_layer_gradients_with_kernel() -> None:
    # the layer's forward runs the kernel and its backward reuses the kernel's constant KKT part
    Q, p, G, h, A, b = random_qp(3, 5, 6, 2, torch.float64, seed=2)
    args = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
    before = call_count(KERNEL_NAME, "numba")
    x = qp(*args, solver=InteriorPoint(kkt_form="normal")).solution
    assert call_count(KERNEL_NAME, "numba") == before + 1
    grads = torch.autograd.grad(x.sum(), args)
    ref_args = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
    xr = qp(*ref_args, solver=InteriorPoint(kkt_form="normal", backend="reference")).solution
    ref = torch.autograd.grad(xr.sum(), ref_args)
    for g1, g2 in zip(grads, ref):
        torch.testing.assert_close(g1, g2, atol=1e-7, rtol=1e-7)
    assert torch.autograd.gradcheck(lambda p_: qp(Q, p_, G, h, A, b, solver=InteriorPoint(kkt_form="normal")).solution,
                                    (p.clone().requires_grad_(),))


def test_empty_batch_and_scalar_problem() -> None:
    Q = torch.eye(3, dtype=torch.float64).expand(0, 3, 3)
    p = torch.zeros(0, 3, dtype=torch.float64)
    G, h = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rk, rr = both((Q, p, G, h, None, None))
    assert rk.solution.shape == rr.solution.shape == (0, 3)
    rk, rr = both((2 * torch.eye(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), None, None, None, None))
    assert_same(rk, rr)
    torch.testing.assert_close(rk.solution, torch.tensor([-0.5], dtype=torch.float64))


def test_threads_give_identical_results() -> None:
    # each element runs on one thread with the same code: results do not depend on the thread count
    data = random_qp(9, 12, 15, 3, torch.float64, seed=4)
    one = InteriorPoint(backend="numba").run(*data)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = InteriorPoint(backend="numba").run(*data)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.solution, two.solution) and torch.equal(one.iterations, two.iterations)


def test_numba_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # without Numba the automatic choice runs the PyTorch loop; a forced Numba backend raises
    monkeypatch.setitem(D._BROKEN, Backend.NUMBA, "simulated: numba failed to import")
    data = random_qp(3, 8, 10, 2, torch.float64, seed=9)
    before = call_count(KERNEL_NAME, "numba")
    res = InteriorPoint(kkt_form="normal").run(*data)
    assert call_count(KERNEL_NAME, "numba") == before and bool(res.converged.all())
    with pytest.raises(KernelUnavailableError, match="simulated"):
        InteriorPoint(backend="numba").run(*data)


@pytest.mark.parametrize("shared_c", [False, True])
def test_compiled_kkt_solve_matches_torch_solve(shared_c: bool) -> None:
    """``kkt_solve_numba`` (the gradient's solves) equals the batched ``kkt.solve_regularized``."""
    from optlayers.kernels.qp_kkt_numba import kkt_solve_numba
    from optlayers.solvers.qp.kkt import factor_kkt, solve_regularized

    Qb, _, Gb, _, Ab, _ = random_qp(5, 7, 6, 2, torch.float64, seed=3)
    if shared_c:  # data shared by the batch (leading dimension 1) are read in place
        Qb, Gb, Ab = Qb[:1], Gb[:1], Ab[:1]
    g = torch.Generator().manual_seed(4)
    w = torch.rand(5, 6, generator=g, dtype=torch.float64) * 10 + 1e-3
    # A moderate δ keeps H well conditioned, so the two orders of rounding agree closely.
    f = factor_kkt(Qb, Ab, Gb, w, torch.full((5, 1), 0.1, dtype=torch.float64))
    rx = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    rc = torch.randn(5, 8, 3, generator=g, dtype=torch.float64)
    dx, dc = kkt_solve_numba(f.L, f.C, f.d, rx, rc)
    ex, ec = solve_regularized(f, rx, rc)
    torch.testing.assert_close(dx, ex, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dc, ec, rtol=1e-9, atol=1e-9)

"""QP layer: implicit KKT gradients (gradcheck, finite differences in the OptNet setting,
cvxpylayers), duals, torch.func transforms, double backward, failure semantics, LP smoothing."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

import optlayers.solvers.qp.adjoint as adjoint_mod
from optlayers._result import ConvergenceError, Status
from optlayers.layers.qp import LPLayer, QPLayer, lp, qp
from optlayers.solvers.qp import QuadraticSmoothing

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if the KKT linear solver ever falls back to the dense solver."""

    def boom(self, *a, **k):
        raise AssertionError("KKTSolve fell back to Dense")

    monkeypatch.setattr(adjoint_mod.Dense, "__call__", boom)


def random_qp(B, n, m, p, *, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(*B, n, n, dtype=dtype, generator=g)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=dtype)
    q = torch.randn(*B, n, dtype=dtype, generator=g)
    G = torch.randn(*B, m, n, dtype=dtype, generator=g)
    x0 = torch.randn(*B, n, dtype=dtype, generator=g)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(*B, m, dtype=dtype, generator=g)
    A = torch.randn(*B, p, n, dtype=dtype, generator=g)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    return [Q, q, G, h, A, b]


def _all_outputs(Q, p, G, h, A, b):
    Qs = 0.5 * (Q + Q.transpose(-1, -2))
    r = qp(Qs, p, G, h, A, b)
    return r.solution, r.aux.eq_dual, r.aux.ineq_dual, r.aux.slack


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_all_inputs_and_duals(shared, no_fallback):
    data = random_qp((2,), 4, 3, 1, seed=1)
    if shared:  # Q, G, A shared over the batch
        data[0], data[2], data[4] = data[0][0], data[2][0], data[4][0]
    args = [t.clone().requires_grad_() for t in data]
    assert torch.autograd.gradcheck(_all_outputs, args, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradcheck_full_jacobian_small(no_fallback):
    data = random_qp((), 3, 2, 1, seed=2)
    args = [t.clone().requires_grad_() for t in data]
    assert torch.autograd.gradcheck(lambda *a: qp(*a).solution, args, atol=1e-6, rtol=1e-5)


def test_optnet_reference_setting_finite_differences():
    """nz=10, 2 equalities, 3 inequalities, Q = LLᵀ, data ×100, feasible by construction."""
    g = torch.Generator().manual_seed(0)
    nz, neq, nineq = 10, 2, 3
    L = torch.rand(nz, nz, dtype=F64, generator=g)
    Q = 100 * (L @ L.T + 1e-3 * torch.eye(nz, dtype=F64))
    G = 100 * torch.randn(nineq, nz, dtype=F64, generator=g)
    z0 = 100 * torch.randn(nz, dtype=F64, generator=g)
    s0 = 100 * torch.rand(nineq, dtype=F64, generator=g)
    p = 100 * torch.randn(nz, dtype=F64, generator=g)
    h = G @ z0 + s0
    A = 100 * torch.randn(neq, nz, dtype=F64, generator=g)
    b = A @ z0
    data = [Q, p, G, h, A, b]
    w = torch.randn(nz, dtype=F64, generator=g)

    args = [t.clone().requires_grad_() for t in data]
    grads = torch.autograd.grad((qp(*args).solution * w).sum(), args)
    for i, (a, gr) in enumerate(zip(data, grads, strict=True)):
        # central differences, all perturbations of input i solved as one batch
        eps = 1e-8 * max(1.0, float(a.abs().max()))
        E = eps * torch.eye(a.numel(), dtype=F64).reshape(a.numel(), *a.shape)
        batch = list(data)
        batch[i] = torch.cat([a + E, a - E])
        x = qp(*batch).solution
        vals = (x * w).sum(-1)
        fd = ((vals[: a.numel()] - vals[a.numel():]) / (2 * eps)).reshape(a.shape)
        torch.testing.assert_close(gr, fd, rtol=1e-4, atol=1e-4 * float(fd.abs().max()))


def test_matches_cvxpylayers_gradients():
    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    cp = pytest.importorskip("cvxpy")
    n, m, k = 5, 4, 2
    data = random_qp((3,), n, m, k, seed=4)
    pp, Gp, hp, Ap, bp = (cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((k, n)),
                          cp.Parameter(k))
    x = cp.Variable(n)
    # cvxpylayers' conic path does not accept a parametric quad_form, so Q enters as Q = LᵀL through
    # sum_squares(L x); the gradient with respect to L checks the one with respect to Q (chain rule).
    Lc = [torch.linalg.cholesky(data[0][i]).mT for i in range(3)]
    Lp = cp.Parameter((n, n))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp @ x) + pp @ x), [Gp @ x <= hp, Ap @ x == bp])
    layer = cvxpylayers.CvxpyLayer(prob, parameters=[Lp, pp, Gp, hp, Ap, bp], variables=[x])
    w = torch.randn(3, n, dtype=F64)
    ref_args = [torch.stack(Lc).requires_grad_()] + [t.clone().requires_grad_() for t in data[1:]]
    (x_ref,) = layer(*ref_args, solver_args={"eps": 1e-10})
    g_ref = torch.autograd.grad((x_ref * w).sum(), ref_args)
    ours = [t.clone().requires_grad_() for t in data]
    Lt = ref_args[0].detach().clone().requires_grad_()
    x_ours = qp(Lt.mT @ Lt, *ours[1:]).solution
    torch.testing.assert_close(x_ours, x_ref, atol=1e-6, rtol=0)
    g_ours = torch.autograd.grad((x_ours * w).sum(), [Lt] + ours[1:])
    for a, b_ in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-5 * max(1.0, float(b_.abs().max())), rtol=1e-5)


def test_torch_func_transforms(no_fallback):
    Q, p, G, h, A, b = random_qp((3,), 5, 4, 1, seed=5)

    def f(Q, p, G, h, A, b):
        return qp(Q, p, G, h, A, b).solution

    torch.testing.assert_close(torch.func.vmap(f)(Q, p, G, h, A, b), f(Q, p, G, h, A, b), atol=1e-10, rtol=0)
    J = torch.func.jacrev(f, argnums=(1, 3))(Q[0], p[0], G[0], h[0], A[0], b[0])
    Jf = torch.func.jacfwd(f, argnums=(1, 3))(Q[0], p[0], G[0], h[0], A[0], b[0])
    for a, c in zip(J, Jf, strict=True):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=0)
    eps = 1e-6
    E = torch.eye(5, dtype=F64)
    fd = torch.stack([(f(Q[0], p[0] + eps * E[i], G[0], h[0], A[0], b[0])
                       - f(Q[0], p[0] - eps * E[i], G[0], h[0], A[0], b[0])) / (2 * eps) for i in range(5)], -1)
    torch.testing.assert_close(J[0], fd, atol=1e-6, rtol=1e-5)
    Jb = torch.func.vmap(torch.func.jacrev(f, argnums=1))(Q, p, G, h, A, b)
    torch.testing.assert_close(Jb[0], J[0], atol=1e-10, rtol=0)


def test_double_backward():
    Q, p, G, h, A, b = random_qp((), 4, 3, 1, seed=6)
    pp, hh = p.clone().requires_grad_(), h.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda p_, h_: qp(Q, p_, G, h_, A, b).solution, (pp, hh),
                                        atol=1e-5, rtol=1e-4, fast_mode=True)


def test_infeasible_element_masked_training():
    g = torch.Generator().manual_seed(7)
    Q = torch.eye(2, dtype=F64).requires_grad_()
    p = torch.randn(3, 2, dtype=F64, generator=g, requires_grad=True)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]], dtype=F64)  # element 1: x1 <= -1, x1 >= 1
    with pytest.raises(ConvergenceError, match=r"INFEASIBLE.*failing batch indices \[1\]"):
        qp(Q, p, G, h)
    res = qp(Q, p, G, h, throw=False)
    assert res.status.tolist() == [0, int(Status.INFEASIBLE), 0]
    assert torch.isnan(res.solution[1]).all()
    ok = res.converged.unsqueeze(-1)
    loss = torch.where(ok, res.solution, torch.zeros_like(res.solution)).pow(2).sum()
    gQ, gp = torch.autograd.grad(loss, [Q, p])
    assert torch.isfinite(gQ).all() and torch.isfinite(gp).all()
    assert float(gp[1].abs().max()) == 0.0
    good = qp(Q, p[[0, 2]], G, h[[0, 2]])
    gQ2, = torch.autograd.grad(good.solution.pow(2).sum(), [Q])
    torch.testing.assert_close(gQ, gQ2, atol=1e-9, rtol=0)


def test_qplayer_module_and_state_dict():
    layer = QPLayer()
    Q, p, G, h, A, b = random_qp((2,), 3, 2, 1, seed=8)
    x = layer(Q, p, G, h, A, b)
    assert x.shape == (2, 3)
    res = layer.solve(Q, p, G, h, A, b)
    torch.testing.assert_close(res.solution, x)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = QPLayer()
    other.load_state_dict(torch.load(buf))
    assert "InteriorPoint" in repr(layer)


def test_lp_smoothing_gradients():
    c = torch.tensor([1.0, 1.5], dtype=F64, requires_grad=True)
    G = -torch.eye(2, dtype=F64)
    h = torch.zeros(2, dtype=F64)
    A = torch.ones(1, 2, dtype=F64)
    b = torch.ones(1, dtype=F64)
    # exact LP: the vertex (1, 0); zero gradient with respect to the cost
    x = lp(c, G, h, A, b, smoothing=None).solution
    torch.testing.assert_close(x, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-9, rtol=0)
    (gc,) = torch.autograd.grad(x[0], c)
    assert float(gc.abs().max()) < 1e-8
    # smoothed: projection of -c/ε onto the simplex, nonzero and correct gradient
    sm = QuadraticSmoothing(1.0)
    x = lp(c, G, h, A, b, smoothing=sm).solution
    torch.testing.assert_close(x, torch.tensor([0.75, 0.25], dtype=F64), atol=1e-9, rtol=0)
    (gc,) = torch.autograd.grad(x[0], c)
    torch.testing.assert_close(gc, torch.tensor([-0.5, 0.5], dtype=F64), atol=1e-8, rtol=0)
    assert torch.autograd.gradcheck(lambda c_: lp(c_, G, h, A, b, smoothing=sm).solution,
                                    (c.detach().clone().requires_grad_(),))
    layer = LPLayer(smoothing=sm)
    assert "QuadraticSmoothing(epsilon=1.0)" in repr(layer)
    torch.testing.assert_close(layer(c, G, h, A, b), x)


def test_float32_gradients_close_to_float64():
    data = random_qp((4,), 6, 5, 1, seed=9)
    a64 = [t.clone().requires_grad_() for t in data]
    a32 = [t.float().requires_grad_() for t in data]
    w = torch.randn(4, 6, dtype=F64)
    g64 = torch.autograd.grad((qp(*a64).solution * w).sum(), a64)
    g32 = torch.autograd.grad((qp(*a32).solution * w.float()).sum(), a32)
    for a, c in zip(g32, g64, strict=True):
        assert float((a.double() - c).abs().max()) <= 1e-2 * max(1.0, float(c.abs().max()))


def test_portfolio_example_quick(tmp_path):
    path = Path(__file__).resolve().parents[2] / "examples" / "portfolio_qp.py"
    spec = importlib.util.spec_from_file_location("portfolio_qp", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    s = mod.run(quick=True, out=str(tmp_path))
    two, e2e = s["two-stage (least squares)"], s["end to end (QP layer)"]
    assert e2e["expected_utility"] > two["expected_utility"]  # better decisions ...
    assert e2e["mse"] > two["mse"]  # ... from worse return predictions
    assert (tmp_path / "portfolio_qp.png").stat().st_size > 1000
    assert (tmp_path / "portfolio_qp.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    data = [t.to(dtype) for t in random_qp((16,), 8, 6, 2, seed=10)]
    w = torch.randn(16, 8, dtype=dtype)
    cpu = [t.clone().requires_grad_() for t in data]
    gpu = [t.cuda().requires_grad_() for t in data]
    x_cpu, x_gpu = qp(*cpu).solution, qp(*gpu).solution
    assert x_gpu.device.type == "cuda"
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=tol, rtol=0)
    g_cpu = torch.autograd.grad((x_cpu * w).sum(), cpu)
    g_gpu = torch.autograd.grad((x_gpu * w.cuda()).sum(), gpu)
    for a, b in zip(g_gpu, g_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=tol * max(1.0, float(b.abs().max())), rtol=0)


@pytest.mark.parametrize("form", ["normal", "schur"])
def test_gradcheck_each_kkt_form(form, no_fallback, monkeypatch):
    """Both KKT forms (interior point and the gradient's factorization) give exact gradients;
    the form not asked for must never run."""
    import optlayers.solvers.qp.interior_point as ip_mod
    from optlayers.solvers.qp import InteriorPoint

    def boom(*a, **k):
        raise AssertionError(f"the {'normal' if form == 'schur' else 'schur'} form ran")

    other = "factor_kkt" if form == "schur" else "factor_schur"
    monkeypatch.setattr(ip_mod, other, boom)
    monkeypatch.setattr(adjoint_mod, other, boom)
    cfg = InteriorPoint(kkt_form=form)
    data = random_qp((3,), 6, 5, 2, seed=4)

    def f(Q, p, G, h, A, b):
        r = qp(0.5 * (Q + Q.mT), p, G, h, A, b, solver=cfg)
        return r.solution, r.aux.ineq_dual

    args = [t.clone().requires_grad_() for t in data]
    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-5, fast_mode=True)
    x = qp(*args, solver=cfg).solution
    grads = torch.autograd.grad((x * torch.arange(6.0, dtype=F64)).sum(), args)
    monkeypatch.undo()
    x_ref = qp(*args, solver=InteriorPoint(kkt_form="normal")).solution
    refs = torch.autograd.grad((x_ref * torch.arange(6.0, dtype=F64)).sum(), args)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-8, rtol=1e-7)

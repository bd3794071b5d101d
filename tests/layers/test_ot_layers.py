"""Gradients of Sinkhorn (envelope / implicit / unroll), the divergence loss, memory, example."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optlayers.layers.ot import Envelope, Implicit, Sinkhorn, SinkhornLoss, Unroll, sinkhorn, sinkhorn_divergence
from optlayers.solvers.ot import PointCloud

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see tests/conftest.py


f64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def problem(n=7, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, m, generator=g, dtype=f64)
    a = torch.rand(n, generator=g, dtype=f64) + 0.2
    b = torch.rand(m, generator=g, dtype=f64) + 0.2
    return C, a / a.sum(), b / b.sum()


@pytest.mark.parametrize("gradient", [Envelope(), Implicit(), Unroll()])
def test_gradcheck_cost_weights_epsilon(gradient):
    C, a, b = problem()

    def value(C, la, lb, eps):
        return sinkhorn(torch.softmax(la, 0), torch.softmax(lb, 0), C, epsilon=eps, tol=1e-12,
                        gradient=gradient).aux.value

    la = a.log().requires_grad_()
    lb = b.log().requires_grad_()
    eps = torch.tensor(0.1, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(value, (C.requires_grad_(), la, lb, eps))


@pytest.mark.parametrize("gradient", [Envelope(), Implicit()])
@pytest.mark.parametrize("online", [False, True])
def test_gradcheck_points(gradient, online):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 8, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(2, 6, 2, generator=g, dtype=f64, requires_grad=True)

    def value(x, y):
        geom = PointCloud(x, y, online=online, block_elements=20)
        return sinkhorn(None, None, geom, epsilon=0.25, tol=1e-12, gradient=gradient).aux.value

    assert torch.autograd.gradcheck(value, (x, y))


def test_envelope_gradient_is_the_plan_and_unbalanced_gradcheck():
    C, a, b = problem()
    C.requires_grad_()
    res = sinkhorn(a, b, C, epsilon=0.1, tol=1e-12)
    (gC,) = torch.autograd.grad(res.aux.value, C)
    assert torch.allclose(gC, res.aux.plan.to_dense(), atol=1e-14)
    for gradient in (Envelope(), Implicit()):
        assert torch.autograd.gradcheck(
            lambda C, a, b: sinkhorn(a, b, C, epsilon=0.25, rho_a=1.0, rho_b=0.3, tol=1e-12,
                                     gradient=gradient).aux.value,
            (C, (a * 1.3).requires_grad_(), b.clone().requires_grad_()))


def test_implicit_potentials_plan_and_agreement_with_unroll():
    C, a, b = problem(6, 6)

    def outputs(gradient):
        def fn(C):
            res = sinkhorn(a, b, C, epsilon=0.2, tol=1e-12, gradient=gradient)
            return res.solution[0], res.solution[1], res.aux.plan.to_dense(), res.aux.transport_cost
        return fn

    C.requires_grad_()
    assert torch.autograd.gradcheck(outputs(Implicit()), (C,))
    J_imp = torch.autograd.functional.jacobian(outputs(Implicit()), C)
    J_unr = torch.autograd.functional.jacobian(outputs(Unroll()), C)
    for ji, ju in zip(J_imp, J_unr, strict=False):
        assert torch.allclose(ji, ju, atol=1e-9)


def test_double_backward_implicit():
    C, a, b = problem(5, 4)
    x = torch.rand(5, 2, dtype=f64, requires_grad=True)
    y = torch.rand(4, 2, dtype=f64)
    assert torch.autograd.gradgradcheck(
        lambda C: sinkhorn(a, b, C, epsilon=0.25, tol=1e-12, gradient=Implicit()).aux.value, (C.requires_grad_(),))
    loss = lambda x: sinkhorn_divergence(None, x, None, y, blur=0.3, tol=1e-12, gradient=Implicit())  # noqa: E731
    assert torch.autograd.gradgradcheck(loss, (x,))


def test_vmap_and_grad_through_sinkhorn():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 6, 2, generator=g, dtype=f64)
    y = torch.rand(3, 5, 2, generator=g, dtype=f64)

    def value(x, y):
        return sinkhorn(None, None, PointCloud(x, y), epsilon=0.05, gradient=Implicit()).aux.value

    grads = torch.func.vmap(torch.func.grad(value))(x, y)
    xs = x.clone().requires_grad_()
    torch.autograd.grad(value(xs, y).sum(), xs)
    ref = torch.autograd.grad(value(xs, y).sum(), xs)[0]
    assert torch.allclose(grads, ref, atol=1e-10)


def test_backward_memory_does_not_grow_with_iterations():
    """Saved tensors of the graph: constant in the iteration count for envelope and implicit."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(60, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(50, 2, generator=g, dtype=f64)

    def saved_bytes(gradient, max_iter):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _ = sinkhorn(None, None, PointCloud(x, y), epsilon=0.01, max_iter=max_iter, gradient=gradient,
                         throw=False).aux.value
        return total[0]

    for gradient in (Envelope(), Implicit()):
        assert saved_bytes(gradient, 5) == saved_bytes(gradient, 50)
    assert saved_bytes(Unroll(), 50) > 5 * saved_bytes(Unroll(), 5)


def test_online_memory_is_linear(tmp_path):
    """n = m = 20,000 in float32: the resident memory grows by far less than one n×m matrix.

    (The backward's memory is checked above through the saved tensors; here the forward, the
    value and the transport cost stream over the 4·10⁸ entries without storing them.)
    """
    script = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        from optlayers.solvers.ot import PointCloud, sinkhorn

        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
        g = torch.Generator().manual_seed(0)
        x = torch.rand(20000, 2, generator=g)
        y = torch.rand(20000, 2, generator=g)
        sinkhorn(None, None, PointCloud(x[:50], y[:50]), epsilon=0.1, throw=False)  # warm-up
        base = rss("VmHWM")
        res = sinkhorn(None, None, PointCloud(x, y), epsilon=0.01, max_iter=3, throw=False)
        assert res.aux.plan.geometry.is_online
        print(rss("VmHWM") - base)
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 300.0, f"resident memory grew by {growth:.0f} MB (a dense cost would be 1600 MB)"


def test_online_implicit_backward_memory_is_linear():
    """Implicit backward (value and transport cost) on an online cloud, n = m = 4,000 in float64.

    One stored 4000×4000 float64 matrix is 128 MB; autograd through the blockwise soft-min kept
    every block for the adjoint solve (> 1 GB here). The matrix-free backward stays far below.
    """
    script = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        from optlayers.solvers.ot import Implicit, PointCloud, sinkhorn

        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
        g = torch.Generator().manual_seed(0)
        x = torch.rand(4000, 2, generator=g, dtype=torch.float64)
        y = torch.rand(4000, 2, generator=g, dtype=torch.float64)
        xs = x[:50].clone().requires_grad_()
        sinkhorn(None, None, PointCloud(xs, y[:50], online=True), epsilon=0.5,
                 gradient=Implicit()).aux.value.backward()  # warm-up
        base = rss("VmHWM")
        xr = x.clone().requires_grad_()
        res = sinkhorn(None, None, PointCloud(xr, y, online=True), epsilon=0.5, gradient=Implicit())
        (res.aux.value + res.aux.transport_cost).backward()
        assert torch.isfinite(xr.grad).all() and float(xr.grad.abs().sum()) > 0
        print(rss("VmHWM") - base)
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 120.0, f"resident memory grew by {growth:.0f} MB (one dense 4000x4000 float64 is 128 MB)"


def test_online_softmin_and_transport_cost_gradients_match_reference():
    """The matrix-free soft-min / streamed transport-cost backwards equal autograd through blocks."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 6, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(2, 5, 2, generator=g, dtype=f64, requires_grad=True)
    eps = torch.tensor([0.3, 0.2], dtype=f64, requires_grad=True)

    def outputs(x, y, eps):
        res = sinkhorn(None, None, PointCloud(x, y, online=True, block_elements=12), epsilon=eps, tol=1e-12,
                       gradient=Implicit())
        return res.aux.value, res.aux.transport_cost, res.solution[0]

    assert torch.autograd.gradcheck(outputs, (x, y, eps))
    from optlayers.solvers.ot._online_softmin import _reference, online_softmin
    h = torch.randn(2, 5, generator=g, dtype=f64)
    h[0, 2] = -float("inf")  # a zero weight
    h.requires_grad_()
    fn = lambda h, e, x, y: online_softmin(x, y, 0.7, h, e, 12)  # noqa: E731
    assert torch.allclose(fn(h, eps, x, y), _reference(h, eps, x, y, 0.7, None))
    assert torch.autograd.gradcheck(lambda hh, xx, yy: fn(hh, eps.detach(), xx, yy), (h, x, y))
    h_fin = torch.where(torch.isfinite(h), h, torch.zeros_like(h)).detach()  # the traced reference
    assert torch.autograd.gradgradcheck(lambda e, xx: fn(h_fin, e, xx, y.detach()), (eps, x))
    jf = torch.func.jacfwd(lambda xx: fn(h_fin, eps.detach(), xx, y.detach()))(x.detach())
    jr = torch.func.jacrev(lambda xx: _reference(h_fin, eps.detach(), xx, y.detach(), 0.7, None))(x.detach())
    assert torch.allclose(jf, jr)
    hv = torch.randn(3, 2, 5, generator=g, dtype=f64)
    out = torch.func.vmap(lambda hh: fn(hh, eps.detach(), x.detach(), y.detach()))(hv)
    assert torch.allclose(out[1], fn(hv[1], eps.detach(), x.detach(), y.detach()))


@pytest.mark.parametrize("rho", [None, 0.7])
def test_fused_envelope_value_gradients(rho):
    """The fused envelope pass (squared-Euclidean clouds) against the traced dual objective."""
    import optlayers.solvers.ot._envelope as env_mod
    from optlayers.solvers.ot.dual import dual_value
    from optlayers.solvers.ot.geometry import PointCloud as PC

    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 8, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(2, 6, 2, generator=g, dtype=f64, requires_grad=True)
    a = (torch.rand(2, 8, generator=g, dtype=f64) + 0.1)
    b = (torch.rand(2, 6, generator=g, dtype=f64) + 0.1)
    a = (a / a.sum(-1, keepdim=True)).requires_grad_()
    b = (b / b.sum(-1, keepdim=True)).requires_grad_()
    eps = torch.tensor([0.3, 0.15], dtype=f64, requires_grad=True)
    f = torch.randn(2, 8, generator=g, dtype=f64) * 0.1
    gg = torch.randn(2, 6, generator=g, dtype=f64) * 0.1
    geom = PC(x, y, "sqeuclidean")
    fused = env_mod.envelope_value(geom, f, gg, a, b, eps, rho, rho)
    assert fused is not None
    ref = dual_value(geom, f, gg, a, b, eps, rho, rho)
    assert torch.allclose(fused[0], ref, atol=1e-12)
    P = torch.exp((f[:, :, None] + gg[:, None, :] - geom.to_dense()) / eps[:, None, None]) * a[:, :, None] * b[:, None]
    assert torch.allclose(fused[1], (P * geom.to_dense()).sum((-1, -2)).detach(), atol=1e-12)
    inputs = (x, y, a, b, eps)
    g1 = torch.autograd.grad(fused[0].sum(), inputs)
    g2 = torch.autograd.grad(ref.sum(), inputs)
    for u, v in zip(g1, g2):
        assert torch.allclose(u, v, atol=1e-10)
    # through sinkhorn (envelope default), with zero weights
    a0 = a.detach().clone()
    a0[0, 3] = 0.0
    a0 = (a0 / a0.sum(-1, keepdim=True)).requires_grad_()
    b0 = b.detach()
    if rho is None:  # balanced: perturbing b alone would unbalance the masses
        assert torch.autograd.gradcheck(
            lambda x, y: sinkhorn(a0, b0, PC(x, y), epsilon=0.25, tol=1e-12).aux.value, (x, y))
    else:
        assert torch.autograd.gradcheck(
            lambda x, y, b: sinkhorn(a0, b, PC(x, y), epsilon=0.25, rho_a=rho, rho_b=rho, tol=1e-12).aux.value,
            (x, y, b))


def test_sinkhorn_loss_properties():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.randn(30, 2, generator=g, dtype=f64) + 1.0
    loss = SinkhornLoss(p=2, blur=0.1)
    assert float(loss(x, x)) == 0.0
    s = loss(x, y)
    assert float(s) > 0
    a = torch.full((40,), 1 / 40, dtype=f64)
    b = torch.full((30,), 1 / 30, dtype=f64)
    assert torch.allclose(loss(a, x, b, y), s, atol=1e-12)
    s.backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    # S >= 0 on random pairs, also unbalanced and for p = 1
    for kw in (dict(), dict(reach=0.5), dict(p=1, blur=0.2)):
        for seed in range(3):
            gg = torch.Generator().manual_seed(seed)
            u = torch.randn(25, 2, generator=gg, dtype=f64)
            v = torch.randn(20, 2, generator=gg, dtype=f64) * 0.5
            assert float(SinkhornLoss(**kw)(u, v)) >= -1e-6
    # batched, state_dict round trip
    xb = torch.randn(3, 20, 2, dtype=f64)
    yb = torch.randn(3, 15, 2, dtype=f64)
    assert SinkhornLoss(blur=0.2)(xb, yb).shape == (3,)
    state = SinkhornLoss().state_dict()
    SinkhornLoss().load_state_dict(state)
    with pytest.raises(ValueError, match="loss\\(x, y\\)"):
        loss(x)


def test_sinkhorn_module():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 8, 3, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(2, 6, 3, generator=g, dtype=f64)
    layer = Sinkhorn(epsilon=0.1, gradient=Implicit())
    out = layer(x, y)
    assert out.shape == (2,)
    out.sum().backward()
    res = layer.solve(torch.cdist(x, y).detach() ** 2)
    assert torch.allclose(res.aux.value, out.detach(), atol=1e-12)


def test_matches_geomloss_when_converged():
    geomloss = pytest.importorskip("geomloss")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 2, generator=g, dtype=f64)
    y = torch.randn(40, 2, generator=g, dtype=f64) + 0.5
    ref = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.5, scaling=0.99, backend="tensorized")(x, y)
    ours = SinkhornLoss(p=2, blur=0.5, tol=1e-9)(x, y)
    assert abs(float(ours) - float(ref)) < 1e-3 * abs(float(ref)) + 1e-6


def test_example_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "point_cloud_matching.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "point_cloud_matching.png").exists()


def test_envelope_refuses_create_graph_on_point_clouds():
    """The fused envelope value gives exact first derivatives and refuses to give a wrong Hessian."""
    g = torch.Generator().manual_seed(9)
    x = torch.rand(6, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(5, 2, generator=g, dtype=f64)
    value = lambda: sinkhorn(None, None, PointCloud(x, y), epsilon=0.2, tol=1e-12).aux.value  # noqa: E731
    (g_env,) = torch.autograd.grad(value(), x)
    (g_imp,) = torch.autograd.grad(
        sinkhorn(None, None, PointCloud(x, y), epsilon=0.2, tol=1e-12, gradient=Implicit()).aux.value, x)
    assert torch.allclose(g_env, g_imp, atol=1e-9)
    with pytest.raises(RuntimeError, match="gradient=Implicit"):
        torch.autograd.grad(value(), x, create_graph=True)

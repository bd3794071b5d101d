"""Exact OT: 1-D by sorting, sliced / max-sliced, network-simplex EMD."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from optlayers.solvers.ot import (
    AndersonAcceleration,
    Anneal,
    emd,
    max_sliced_wasserstein,
    sinkhorn,
    sliced_wasserstein,
    wasserstein_1d,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see tests/conftest.py


f64 = torch.float64


def test_wasserstein_1d_matches_scipy_and_pot():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(30, generator=g, dtype=f64)
    v = torch.randn(45, generator=g, dtype=f64) * 2 + 1
    uw = torch.rand(30, generator=g, dtype=f64)
    vw = torch.rand(45, generator=g, dtype=f64)
    w = wasserstein_1d(u, v, uw, vw, p=1)
    assert abs(float(w) - scipy.stats.wasserstein_distance(u, v, uw, vw)) < 1e-12
    assert abs(float(wasserstein_1d(u, v)) - scipy.stats.wasserstein_distance(u, v)) < 1e-12
    ot = pytest.importorskip("ot")
    for p in (1, 2, 3):
        ref = ot.wasserstein_1d(u.numpy(), v.numpy(), (uw / uw.sum()).numpy(), (vw / vw.sum()).numpy(), p=p)
        assert abs(float(wasserstein_1d(u, v, uw, vw, p=p)) ** p - float(ref)) < 1e-10


def test_wasserstein_1d_batched_gaussians_and_gradients():
    g = torch.Generator().manual_seed(1)
    n = 20000
    z = torch.randn(2, n, generator=g, dtype=f64)
    m1, s1, m2, s2 = 0.3, 1.0, -0.5, 2.0
    w2 = wasserstein_1d(m1 + s1 * z[0], m2 + s2 * z[1], p=2)
    assert abs(float(w2) - math.hypot(m1 - m2, s1 - s2)) < 0.05
    u = torch.randn(3, 10, dtype=f64, requires_grad=True)
    v = torch.randn(3, 7, dtype=f64)
    out = wasserstein_1d(u, v, p=2)
    assert out.shape == (3,)
    out.sum().backward()
    assert torch.isfinite(u.grad).all()
    same = wasserstein_1d(u, u.detach(), p=2)
    assert float(same.abs().max()) == 0.0
    x = u.detach().clone().requires_grad_()
    wasserstein_1d(x, x.detach().clone(), p=2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_w2_between_gaussians_matches_bures():
    g = torch.Generator().manual_seed(2)
    n = 1000
    m1, m2 = torch.tensor([0.0, 0.0], dtype=f64), torch.tensor([1.0, 0.5], dtype=f64)
    A1 = torch.tensor([[1.0, 0.3], [0.0, 0.6]], dtype=f64)
    A2 = torch.tensor([[0.5, 0.0], [0.2, 1.2]], dtype=f64)
    S1, S2 = A1 @ A1.T, A2 @ A2.T
    x = m1 + torch.randn(n, 2, generator=g, dtype=f64) @ A1.T
    y = m2 + torch.randn(n, 2, generator=g, dtype=f64) @ A2.T

    def sqrtm(S):
        e, V = torch.linalg.eigh(S)
        return V @ torch.diag(e.clamp_min(0).sqrt()) @ V.T

    r1 = sqrtm(S1)
    bures = torch.trace(S1 + S2 - 2 * sqrtm(r1 @ S2 @ r1))
    w2_sq = float(((m1 - m2) ** 2).sum() + bures)
    exact = float(emd(None, None, torch.cdist(x, y) ** 2).aux.value)
    assert abs(exact - w2_sq) < 0.08 * w2_sq


def test_sliced_and_max_sliced():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200, 3, generator=g, dtype=f64, requires_grad=True)
    y = torch.randn(2, 150, 3, generator=g, dtype=f64) + 1
    gen = torch.Generator().manual_seed(0)
    sw = sliced_wasserstein(x, y, n_projections=64, generator=gen)
    gen = torch.Generator().manual_seed(0)
    msw = max_sliced_wasserstein(x, y, n_projections=64, generator=gen)
    assert sw.shape == (2,) and bool((msw >= sw).all())
    w2 = torch.stack([emd(None, None, torch.cdist(x[i], y[i]) ** 2).aux.value for i in range(2)]).sqrt()
    assert bool((msw <= w2 + 1e-9).all())
    (sw.sum() + msw.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert float(sliced_wasserstein(x[0], x[0].detach())) == 0.0
    # explicit projections: one axis gives the 1-D distance of that coordinate
    proj = torch.tensor([[1.0], [0.0], [0.0]], dtype=f64)
    one = sliced_wasserstein(x[0], y[0], projections=proj, p=1)
    assert abs(float(one) - float(wasserstein_1d(x[0, :, 0], y[0, :, 0]))) < 1e-12


def test_emd_matches_pot_and_gradients():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 12, 2, generator=g, dtype=f64, requires_grad=True)
    y = torch.rand(2, 9, 2, generator=g, dtype=f64)
    a = torch.rand(2, 12, generator=g, dtype=f64)
    a = a / a.sum(-1, keepdim=True)
    C = torch.cdist(x, y) ** 2
    res = emd(a, None, C)
    for i in range(2):
        ref = ot.emd2(a[i].numpy(), np.full(9, 1 / 9), C[i].detach().numpy())
        assert abs(float(res.aux.value[i]) - ref) < 1e-12
    Cl = C.detach().clone().requires_grad_()
    al = a.clone().requires_grad_()
    out = emd(al, None, Cl)
    gC, ga = torch.autograd.grad(out.aux.value.sum(), (Cl, al))
    assert torch.allclose(gC, out.aux.plan)
    assert torch.allclose(ga, out.solution[0])
    res.aux.value.sum().backward()
    assert torch.isfinite(x.grad).all()
    # potentials: f_i + g_j <= C_ij with equality on the support of the plan
    f, gg = out.solution
    slack = C.detach() - f[..., :, None] - gg[..., None, :]
    assert float(slack.min()) > -1e-10
    assert float((slack * (out.aux.plan > 1e-14)).abs().max()) < 1e-10


def test_sinkhorn_value_at_tiny_epsilon_near_emd():
    g = torch.Generator().manual_seed(5)
    C = torch.rand(15, 15, generator=g, dtype=f64)
    exact = float(emd(None, None, C).aux.value)
    res = sinkhorn(None, None, C, epsilon=3e-3, relative_epsilon=True, anneal=Anneal(),
                   acceleration=AndersonAcceleration(), max_iter=50000)
    assert 0 <= float(res.aux.transport_cost) - exact < 1e-2 * exact

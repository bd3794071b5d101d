"""LDR, Wasserstein, Prospect and Dr. DPO."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optlayers import ConvergenceError
from optlayers.layers.dro import (
    DROLoss,
    LDRLoss,
    Prospect,
    WassersteinLinearLoss,
    WassersteinPenaltyLoss,
    dpo_losses,
    dr_dpo_loss,
    ldr_loss,
    wasserstein_certificate,
    wasserstein_linear_risk,
)
from optlayers.solvers.dro import KLPenalty, Spectral, esrm, robust_weights

# ------------------------------------------------------------------------------------------ LDR


def test_ldr_is_kl_penalty_over_classes_and_limits() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    c, lam = 0.5, 0.7
    ours = ldr_loss(z, y, lam=lam, margin=c, normalize_logits=False, reduction="none")
    onehot = F.one_hot(y, 4).double()
    d = z - (z * onehot).sum(1, keepdim=True) + c * (1 - onehot)
    ref = robust_weights(d, KLPenalty(lam)).aux.value
    assert torch.allclose(ours, ref, atol=1e-14)
    # gradient w.r.t. the logits: p* - e_y (Danskin)
    ours.sum().backward()
    p = torch.softmax(d.detach() / lam, 1)
    assert torch.allclose(z.grad, p - onehot, atol=1e-12)
    # c = 0, lam = 1: cross-entropy - log K; lam -> 0: Crammer-Singer hinge
    ce = ldr_loss(z, y, lam=1.0, margin=0.0, normalize_logits=False, reduction="none")
    assert torch.allclose(ce, F.cross_entropy(z, y, reduction="none") - math.log(4), atol=1e-12)
    hinge = ldr_loss(z, y, lam=1e-4, margin=1.0, normalize_logits=False, reduction="none")
    d1 = z - (z * onehot).sum(1, keepdim=True) + (1 - onehot)
    assert torch.allclose(hinge, d1.amax(1), atol=1e-3)


def test_aldr_per_example_lambdas() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    m = LDRLoss(lam=1.0, adaptive=True, n_examples=10, alpha=2.0)
    idx = torch.tensor([7, 2, 5, 0])
    m(z, y, index=idx)
    changed = m.lams != 1.0
    assert set(torch.nonzero(changed).reshape(-1).tolist()) <= set(idx.tolist())
    assert bool((m.lams[idx] < 1.0).all()) and bool((m.lams[idx] > 0).all())
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = LDRLoss(lam=1.0, adaptive=True, n_examples=10)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.lams, m.lams)
    with pytest.raises(ValueError, match="index"):
        m(z, y)
    with pytest.raises(ValueError, match="n_examples"):
        LDRLoss(adaptive=True)


# ------------------------------------------------------------------------------------ Wasserstein


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def test_wrm_inner_solution_and_danskin_gradient() -> None:
    model = _net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    wrm = WassersteinPenaltyLoss(gamma=3.0, rtol=1e-12, atol=1e-13, max_iter=300)
    res = wrm.solve(model, x, y)
    assert bool(res.converged.all())
    xs = res.solution.clone().requires_grad_(True)
    gl = torch.autograd.grad(F.cross_entropy(model(xs), y, reduction="sum"), xs)[0]
    assert torch.allclose(xs.detach(), x + gl / (2 * 3.0), atol=1e-10)  # stationarity
    # certificate at the empirical radius equals the adversarial risk
    aux = res.aux
    rho_hat = float(aux.transport_cost.mean())
    adv = float(F.cross_entropy(model(res.solution), y).detach())
    assert abs(float(wasserstein_certificate(aux, rho_hat).detach()) - adv) < 1e-10
    # Danskin: d/dtheta of E phi equals a finite difference of the re-solved E phi
    w = model[0].weight
    loss = wrm(model, x, y)
    loss.backward()
    grad = w.grad[1, 2].item()
    h = 1e-5
    with torch.no_grad():
        w[1, 2] += h
    vp = float(wrm(model, x, y).detach())
    with torch.no_grad():
        w[1, 2] -= 2 * h
    vm = float(wrm(model, x, y).detach())
    assert abs(grad - (vp - vm) / (2 * h)) < 1e-7
    assert model.training  # mode restored


def test_wrm_iteration_limit_raises() -> None:
    model = _net()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ConvergenceError, match="WassersteinPenaltyLoss"):
        WassersteinPenaltyLoss(gamma=1.0, max_iter=1, rtol=1e-12)(model, x, y)
    res = WassersteinPenaltyLoss(gamma=1.0, max_iter=1, rtol=1e-12, throw=False).solve(model, x, y)
    assert not bool(res.converged.any())


def _linear_data(n: int = 30, d: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.sign(x[:, 0] + 0.5 * rng.normal(size=n))
    w = rng.normal(size=d)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w), 0.3


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_linear_wasserstein_label_flip_dual_matches_cvxpy(p: float) -> None:
    cp = pytest.importorskip("cvxpy")
    x, y, w, b = _linear_data()
    eps, kappa = 0.1, 0.5
    ours = float(wasserstein_linear_risk(w, b, x, y, eps, kappa=kappa, p=p))
    m = (y * (x @ w + b)).numpy()
    q = {1.0: np.inf, 2.0: 2, math.inf: 1}[p]
    lam, s = cp.Variable(), cp.Variable(len(m))
    cons = [s >= np.logaddexp(0, -m), s >= np.logaddexp(0, m) - lam * kappa, lam >= np.linalg.norm(w.numpy(), q)]
    prob = cp.Problem(cp.Minimize(lam * eps + cp.sum(s) / len(m)), cons)
    prob.solve(solver=cp.CLARABEL)
    assert abs(ours - prob.value) <= 1e-7 * abs(prob.value)
    # fixed labels: norm regularisation, and a huge flip cost reduces to it
    reg = float(F.softplus(-(y * (x @ w + b))).mean() + eps * torch.linalg.vector_norm(w, q))
    assert abs(float(wasserstein_linear_risk(w, b, x, y, eps, p=p)) - reg) < 1e-12
    assert abs(float(wasserstein_linear_risk(w, b, x, y, eps, kappa=1e6, p=p)) - reg) < 1e-9


def test_linear_wasserstein_module_gradient() -> None:
    x, y, _, _ = _linear_data(seed=1)
    lin = torch.nn.Linear(3, 1).double()
    loss = WassersteinLinearLoss(0.2, kappa=1.0, loss="hinge")(lin, x, y)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# --------------------------------------------------------------------------------------- Prospect


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_linear_wasserstein_gradient_at_zero_weights_is_finite(p: float) -> None:
    # at w = 0 the dual norm is not differentiable; autograd must give a subgradient, not NaN
    # (a fit started from zero weights otherwise turns into NaN at the first step)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(30, generator=g) < 0.5, -1.0, 1.0).double()
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    risk = wasserstein_linear_risk(w, b, x, y, 0.1, p=p)
    risk.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad)
    assert math.isclose(float(risk), math.log(2.0), rel_tol=1e-15)
    # the smooth part's gradient is recovered exactly (the norm contributes the zero subgradient)
    expected = -(y[:, None] * x).mean(0) * 0.5
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-14)


def test_prospect_converges_to_the_full_objective_minimiser() -> None:
    g = torch.Generator().manual_seed(3)
    n, d = 32, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    yv = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise
    spec = Spectral(esrm(2.0), lam=0.5)
    mu = 0.1

    def per_example(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return 0.5 * (X[idx] @ w - yv[idx]) ** 2

    # reference minimiser of F(w) = R(l(w)) + mu/2 |w|^2 (smooth: Danskin gradient is exact)
    w_ref = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([w_ref], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                              line_search_fn="strong_wolfe")
    risk = DROLoss(spec)

    def full_closure() -> torch.Tensor:
        lbfgs.zero_grad()
        f = risk(per_example(w_ref, torch.arange(n))) + 0.5 * mu * (w_ref ** 2).sum()
        f.backward()
        return f

    lbfgs.step(full_closure)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = Prospect([w], lr=0.02, spec=spec, n_examples=n, weight_decay=mu, generator=torch.Generator().manual_seed(0))
    opt.init_tables(lambda idx: per_example(w, idx))
    for _ in range(30 * n):  # linear convergence: ~1e-7 after 30 epochs
        i = opt.sample()

        def closure(i: int = i) -> torch.Tensor:
            opt.zero_grad()
            loss = per_example(w, torch.tensor([i])).sum()
            loss.backward()
            return loss

        opt.step(i, closure)
    assert float((w.detach() - w_ref.detach()).norm()) < 1e-6
    state = opt.state_dict()
    assert "prospect" in state["state"]


def test_prospect_validation() -> None:
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lam > 0"):
        Prospect([w], lr=0.1, spec=Spectral(esrm(1.0)), n_examples=3)
    opt = Prospect([w], lr=0.1, spec=Spectral(esrm(1.0), lam=0.1), n_examples=3)
    with pytest.raises(RuntimeError, match="init_tables"):
        opt.step(0, lambda: torch.zeros(()))


# ---------------------------------------------------------------------------------------- Dr. DPO


def test_dr_dpo_loss() -> None:
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    pc.requires_grad_(True)
    beta, bp = 0.5, 0.3
    loss = dr_dpo_loss(pc, pr, rc, rr, beta=beta, beta_prime=bp)
    ell = dpo_losses(pc, pr, rc, rr, beta=beta)
    ref = -bp * (torch.logsumexp(-ell / bp, 0) - math.log(16))
    assert torch.allclose(loss, ref, atol=1e-12)
    loss.backward()
    wts = torch.softmax(-ell.detach() / bp, 0)  # high-loss pairs are down-weighted
    ell2 = dpo_losses(pc.detach().requires_grad_(True), pr, rc, rr, beta=beta)
    assert torch.isfinite(pc.grad).all() and pc.grad.shape == (16,)
    assert float(wts[ell.detach().argmax()]) == float(wts.min())
    # beta' -> infinity: plain DPO mean
    big = dr_dpo_loss(pc, pr, rc, rr, beta=beta, beta_prime=1e8)
    assert torch.allclose(big, ell2.mean(), atol=1e-6)

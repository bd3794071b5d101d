"""Hypergradients of ridge regression with per-feature penalties against the closed form."""

import pytest
import torch

from optlayers.implicit import CG, ImplicitAdjoint, Neumann, UnrollAdjoint
from optlayers.implicit import HyperOptimizer
from optlayers.implicit.hypergradient import PenaltyMethod, hypergradient

DT = torch.float64


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    Xtr, ytr = torch.randn(40, 5, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    Xva, yva = torch.randn(30, 5, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    lam = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=DT)

    def inner(w, lam):
        return 0.5 * ((Xtr @ w - ytr) ** 2).sum() + 0.5 * (lam * w ** 2).sum()

    def outer(w, lam):
        return 0.5 * ((Xva @ w - yva) ** 2).sum()

    H = Xtr.T @ Xtr + torch.diag(lam)
    w = torch.linalg.solve(H, Xtr.T @ ytr)
    # dL/dλ_j = -(H⁻¹ ∇_w L_out)_j w_j
    exact = -torch.linalg.solve(H, Xva.T @ (Xva @ w - yva)) * w
    L = float(torch.linalg.eigvalsh(H).max())
    return inner, outer, w, lam, exact, L


def test_implicit_cg_exact(problem):
    inner, outer, w, lam, exact, _ = problem
    res = hypergradient(outer, inner, w, lam, method=ImplicitAdjoint(linear_solver=CG()))
    torch.testing.assert_close(res.solution, exact, rtol=1e-8, atol=1e-12)
    assert bool(res.converged)


def test_neumann_error_decreases_monotonically(problem):
    inner, outer, w, lam, exact, L = problem
    errors = []
    for terms in (5, 20, 80, 320):
        res = hypergradient(outer, inner, w, lam, method=ImplicitAdjoint(linear_solver=Neumann(terms, 1.0 / L)))
        errors.append(float(torch.linalg.vector_norm(res.solution - exact)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_penalty_error_proportional_to_sigma(problem):
    inner, outer, w, lam, exact, _ = problem
    errors = []
    for sigma in (1e-2, 1e-3, 1e-4):
        res = hypergradient(outer, inner, w, lam, method=PenaltyMethod(sigma, steps=500, rtol=1e-10))
        errors.append(float(torch.linalg.vector_norm(res.solution - exact)))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(5 < r < 20 for r in ratios), (errors, ratios)


def test_unroll_converges_to_implicit(problem):
    inner, outer, w, lam, exact, _ = problem
    res = hypergradient(outer, inner, w, lam, method=UnrollAdjoint(steps=1000, truncate=1000))
    torch.testing.assert_close(res.solution, exact, rtol=1e-5, atol=1e-8)


def test_pytree_and_module_params():
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(25, 3, generator=g, dtype=DT), torch.randn(25, generator=g, dtype=DT)
    model = torch.nn.Linear(3, 1, bias=False).double()
    hp = {"decay": torch.ones(1, 3, dtype=DT)}

    def inner(p, h):
        pred = torch.func.functional_call(model, p, (X,)).squeeze(-1)
        return 0.5 * ((pred - y) ** 2).sum() + 0.5 * (h["decay"] * p["weight"] ** 2).sum()

    def outer(p, h):
        return ((torch.func.functional_call(model, p, (X,)).squeeze(-1) - 1.0) ** 2).mean()

    with torch.no_grad():
        model.weight.copy_(torch.linalg.solve(X.T @ X + torch.eye(3, dtype=DT), X.T @ y).unsqueeze(0))
    before = model.weight.clone()
    res = hypergradient(outer, inner, model, hp)
    assert set(res.solution) == {"decay"} and res.solution["decay"].shape == (1, 3)
    assert torch.equal(model.weight, before)
    assert torch.isfinite(res.solution["decay"]).all()


def test_hyper_optimizer_lowers_validation_loss(problem):
    inner, outer, w_star, lam, exact, _ = problem
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    log_lam = torch.zeros(5, dtype=DT, requires_grad=True)
    inner_log = lambda w_, h: inner(w_, h.exp())  # noqa: E731
    outer_log = lambda w_, h: outer(w_, h.exp())  # noqa: E731
    opt = HyperOptimizer(outer_log, inner_log, w, log_lam, torch.optim.LBFGS([w], max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-15),
                         torch.optim.Adam([log_lam], lr=0.1), inner_steps=2)
    logs = [opt.step() for _ in range(15)]
    assert logs[-1]["outer_loss"] < logs[0]["outer_loss"]
    assert all(entry["inner_residual"] < 1e-5 for entry in logs[1:]), logs
    with pytest.raises(ValueError, match="inner_steps"):
        HyperOptimizer(outer_log, inner_log, w, log_lam, opt.inner_optimizer, opt.outer_optimizer, inner_steps=-1)

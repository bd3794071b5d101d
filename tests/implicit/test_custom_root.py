"""The promises of the implicit core on ridge regression, where everything has a closed form."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from optlayers.implicit import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGStab,
    Dense,
    ImplicitAdjoint,
    Neumann,
    NormalCG,
    OneStepAdjoint,
    UnrollAdjoint,
    custom_fixed_point,
    custom_root,
    stationarity,
)

DT = torch.float64
EXACT_SOLVERS = [CG(), MINRES(), GMRES(), BiCGStab(), NormalCG(), Dense(), Auto(), Dense(method="lu")]


def exact_derivatives(X, lam, z):
    H = X.T @ X + lam * torch.eye(X.shape[1], dtype=DT)
    d1 = -torch.linalg.solve(H, z)
    d2 = 2 * torch.linalg.solve(H, torch.linalg.solve(H, z))
    return d1, d2


def make_root_solver(X, y, objective, closed_form, linear_solver):
    @custom_root(stationarity(objective), adjoint=ImplicitAdjoint(linear_solver=linear_solver))
    def solve(z0, lam):
        return closed_form(lam)

    return solve


def make_fixed_point_solver(X, y, objective, closed_form, linear_solver, eta):
    def T(z, lam):  # one gradient step
        return z - eta * (X.T @ (X @ z - y) + lam * z)

    @custom_fixed_point(T, adjoint=ImplicitAdjoint(linear_solver=linear_solver))
    def solve(z0, lam):
        return closed_form(lam)

    return solve


def lipschitz(X, lam):
    return float(torch.linalg.eigvalsh(X.T @ X).max()) + lam


@pytest.mark.parametrize("linear_solver", EXACT_SOLVERS, ids=lambda s: repr(s)[:20])
@pytest.mark.parametrize("form", ["root", "fixed_point"])
def test_ridge_first_derivative_every_linear_solver(ridge_problem, linear_solver, form):
    X, y, objective, closed_form = ridge_problem
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    if form == "root":
        solve = make_root_solver(X, y, objective, closed_form, linear_solver)
    else:
        solve = make_fixed_point_solver(X, y, objective, closed_form, linear_solver, 1.0 / lipschitz(X, 0.7))
    z = solve(torch.zeros(4, dtype=DT), lam)
    jac = torch.autograd.functional.jacobian(lambda lam_: solve(torch.zeros(4, dtype=DT), lam_), lam)
    d1, _ = exact_derivatives(X, 0.7, z.detach())
    torch.testing.assert_close(jac, d1, rtol=1e-8, atol=0)


@pytest.mark.parametrize("form", ["root", "fixed_point"])
def test_ridge_neumann_to_truncation_error(ridge_problem, form):
    X, y, objective, closed_form = ridge_problem
    L = lipschitz(X, 0.7)
    errors = []
    for terms in (10, 40, 160):
        if form == "root":
            solve = make_root_solver(X, y, objective, closed_form, Neumann(terms, 1.0 / L))
        else:
            solve = make_fixed_point_solver(X, y, objective, closed_form, Neumann(terms, 1.0), 1.0 / L)
        lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
        z = solve(torch.zeros(4, dtype=DT), lam)
        g = torch.autograd.grad(z.sum(), lam)[0]
        d1, _ = exact_derivatives(X, 0.7, z.detach())
        # Truncation error of α Σ_{k<K} (I − αH)^k: the remainder (I − αH)^K H⁻¹ b.
        H = X.T @ X + 0.7 * torch.eye(4, dtype=DT)
        M = torch.eye(4, dtype=DT) - H / L
        predicted = (torch.linalg.matrix_power(M, terms) @ torch.linalg.solve(H, torch.ones(4, dtype=DT)))
        bound = float(predicted.abs().sum() * z.detach().abs().max() * 4) + 1e-12
        err = abs(float(g - d1.sum()))
        assert err <= max(bound, 1e-10)
        errors.append(err)
    assert errors[0] > errors[1] > errors[2] or errors[2] < 1e-10


@pytest.mark.parametrize("linear_solver", [CG(), GMRES(), Dense()], ids=["CG", "GMRES", "Dense"])
def test_ridge_second_derivative(ridge_problem, linear_solver):
    X, y, objective, closed_form = ridge_problem
    solve = make_root_solver(X, y, objective, closed_form, linear_solver)
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    z = solve(torch.zeros(4, dtype=DT), lam)
    _, d2 = exact_derivatives(X, 0.7, z.detach())
    # double backward, one coordinate at a time
    rows = []
    for i in range(4):
        g = torch.autograd.grad(z[i], lam, create_graph=True)[0]
        rows.append(torch.autograd.grad(g, lam, retain_graph=True)[0])
    torch.testing.assert_close(torch.stack(rows), d2, rtol=1e-8, atol=0)
    # forward-over-reverse with torch.func
    f = lambda lam_: solve(torch.zeros(4, dtype=DT), lam_)  # noqa: E731
    hess = torch.func.jacfwd(torch.func.jacrev(f))(lam.detach())
    torch.testing.assert_close(hess, d2, rtol=1e-8, atol=0)
    # reverse-over-reverse
    hess2 = torch.func.jacrev(torch.func.jacrev(f))(lam.detach())
    torch.testing.assert_close(hess2, d2, rtol=1e-8, atol=0)


def test_torch_func_transforms(ridge_problem):
    X, y, objective, closed_form = ridge_problem
    solve = make_root_solver(X, y, objective, closed_form, Auto())
    f = lambda lam_: solve(torch.zeros(4, dtype=DT), lam_)  # noqa: E731
    lams = torch.tensor([0.3, 0.7, 2.0], dtype=DT)
    batched = torch.func.vmap(f)(lams)
    looped = torch.stack([f(v) for v in lams])
    torch.testing.assert_close(batched, looped)
    g = torch.func.grad(lambda lam_: f(lam_).sum())(lams[1])
    d1, d2 = exact_derivatives(X, 0.7, closed_form(0.7))
    torch.testing.assert_close(g, d1.sum(), rtol=1e-8, atol=0)
    torch.testing.assert_close(torch.func.jacrev(f)(lams[1]), d1, rtol=1e-8, atol=0)
    torch.testing.assert_close(torch.func.jacfwd(f)(lams[1]), d1, rtol=1e-8, atol=0)
    h = torch.func.hessian(lambda lam_: f(lam_).sum())(lams[1])
    torch.testing.assert_close(h, d2.sum(), rtol=1e-8, atol=0)
    # vmap of grad: per-lambda gradients in one call
    vg = torch.func.vmap(torch.func.grad(lambda lam_: f(lam_).sum()))(lams)
    expected = torch.stack([exact_derivatives(X, float(v), closed_form(float(v)))[0].sum() for v in lams])
    torch.testing.assert_close(vg, expected, rtol=1e-8, atol=0)


def test_forward_mode_matches_finite_differences(ridge_problem):
    X, y, objective, closed_form = ridge_problem
    solve = make_root_solver(X, y, objective, closed_form, GMRES())
    f = lambda lam_: solve(torch.zeros(4, dtype=DT), lam_)  # noqa: E731
    lam, h = torch.tensor(0.7, dtype=DT), 1e-6
    _, tangent = torch.func.jvp(f, (lam,), (torch.ones((), dtype=DT),))
    fd = (f(lam + h) - f(lam - h)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-7, atol=1e-10)
    # torch.autograd.forward_ad too
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = f(fwAD.make_dual(lam, torch.ones((), dtype=DT)))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, fd, rtol=1e-7, atol=1e-10)


def test_gradcheck_and_gradgradcheck_pytree_params():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randn(12, generator=g, dtype=DT)

    def objective(z, params):
        return 0.5 * ((X @ z - params["y"]) ** 2).sum() + 0.5 * (params["w"] * z ** 2).sum()

    @custom_root(stationarity(objective))
    def solve(z0, params):
        return torch.linalg.solve(X.T @ X + torch.diag(params["w"]), X.T @ params["y"])

    w = torch.tensor([0.5, 1.0, 2.0], dtype=DT, requires_grad=True)
    yy = y.clone().requires_grad_()
    fn = lambda w_, y_: solve(torch.zeros(3, dtype=DT), {"w": w_, "y": y_})  # noqa: E731
    assert gradcheck(fn, (w, yy))
    assert gradgradcheck(fn, (w, yy))


def test_batched_custom_root_and_throw_false():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, 4, generator=g, dtype=DT)
    A = A @ A.transpose(-1, -2) + 4 * torch.eye(4, dtype=DT)
    b = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)

    @custom_root(lambda z, b: (A @ z.unsqueeze(-1)).squeeze(-1) - b, batch_ndim=1)
    def solve(z0, b):
        return torch.linalg.solve(A, b)

    z = solve(torch.zeros(3, 4, dtype=DT), b)
    grad = torch.autograd.grad(z.sum(), b)[0]
    expected = torch.linalg.solve(A.transpose(-1, -2), torch.ones(3, 4, dtype=DT))
    torch.testing.assert_close(grad, expected)


def test_one_step_and_unroll_adjoints(ridge_problem):
    X, y, objective, closed_form = ridge_problem
    eta = 1.0 / lipschitz(X, 0.7)

    def T(z, lam):
        return z - eta * (X.T @ (X @ z - y) + lam * z)

    def iterate(z0, lam):
        z = z0
        for _ in range(3000):
            z = T(z, lam)
        return z

    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    unrolled = custom_fixed_point(T, adjoint=UnrollAdjoint())(iterate)(torch.zeros(4, dtype=DT), lam)
    g_unroll = torch.autograd.grad(unrolled.sum(), lam)[0]
    d1, _ = exact_derivatives(X, 0.7, closed_form(0.7))
    torch.testing.assert_close(g_unroll, d1.sum(), rtol=1e-6, atol=0)
    jfb = custom_fixed_point(T, adjoint=OneStepAdjoint())(iterate)(torch.zeros(4, dtype=DT), lam)
    g_jfb = torch.autograd.grad(jfb.sum(), lam)[0]
    # JFB: θ̄ = (∂_θ T)ᵀ ḡ = −η Σ z
    torch.testing.assert_close(g_jfb, -eta * closed_form(0.7).sum(), rtol=1e-10, atol=0)

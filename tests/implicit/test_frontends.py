"""root_solve, fixed_point, minimize, least_squares: gradients, transforms and failure semantics."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
from torch.autograd import gradcheck, gradgradcheck

from optlayers import AdjointSolveError, ConvergenceError, Status
from optlayers.implicit import (
    CG,
    LBFGS,
    Anderson,
    Broyden,
    Dense,
    GaussNewton,
    ImplicitAdjoint,
    LevenbergMarquardt,
    Newton,
    Picard,
    ProjectedGradient,
    ProximalGradient,
    UnrollAdjoint,
    custom_root,
    fixed_point,
    least_squares,
    minimize,
    projected_gradient_fp,
    proximal_gradient_fp,
    root_solve,
)
from optlayers.solvers.projections import project_box
from optlayers.solvers.prox import prox_l1

DT = torch.float64


def sqrt_root(a, **kw):
    return root_solve(lambda z, a: z ** 2 - a, torch.ones_like(a), a, **kw).solution


@pytest.mark.parametrize("solver", [Newton(), Broyden()], ids=["Newton", "Broyden"])
def test_root_solve_gradient_and_batch(solver):
    a = torch.tensor([2.0, 3.0, 5.0], dtype=DT, requires_grad=True)
    z = sqrt_root(a, solver=solver, batch_ndim=1)
    torch.testing.assert_close(z, a.detach().sqrt(), rtol=1e-10, atol=0)
    (g,) = torch.autograd.grad(z.sum(), a)
    torch.testing.assert_close(g, 0.5 / a.detach().sqrt(), rtol=1e-9, atol=0)


def test_root_solve_transforms_and_checks():
    f = lambda a: sqrt_root(a)  # noqa: E731  (batch_ndim=0: one problem per call)
    a = torch.tensor([2.0, 3.0, 5.0], dtype=DT)
    torch.testing.assert_close(torch.func.vmap(f)(a), a.sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(a), 0.5 / a.sqrt(), rtol=1e-9, atol=0)
    x = torch.tensor(3.0, dtype=DT)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), 0.5 / x.sqrt(), rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.func.hessian(f)(x), -0.25 * x ** -1.5, rtol=1e-8, atol=0)
    x = x.clone().requires_grad_()
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


def test_fixed_point_gradient_transforms():
    T = lambda z, a: 0.5 * torch.cos(z) + a  # noqa: E731
    for solver in (Picard(), Anderson()):
        a = torch.tensor([0.3, 1.0], dtype=DT, requires_grad=True)
        r = fixed_point(T, torch.zeros(2, dtype=DT), a, solver=solver, batch_ndim=1)
        z = r.solution
        torch.testing.assert_close(z, T(z, a), rtol=0, atol=1e-10)
        (g,) = torch.autograd.grad(z.sum(), a)
        torch.testing.assert_close(g, 1 / (1 + 0.5 * torch.sin(z.detach())), rtol=1e-9, atol=0)
    f = lambda a: fixed_point(T, torch.zeros((), dtype=DT), a).solution  # noqa: E731
    a = torch.tensor([0.3, 1.0], dtype=DT)
    loop = torch.stack([f(v) for v in a])
    torch.testing.assert_close(torch.func.vmap(f)(a), loop)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(f))(a), 1 / (1 + 0.5 * torch.sin(loop)),
                               rtol=1e-9, atol=0)
    x = torch.tensor(0.7, dtype=DT, requires_grad=True)
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))


def test_minimize_ridge_gradient_and_hessian():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    f = lambda z, lam: 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z ** 2).sum()  # noqa: E731
    sol = lambda lam: minimize(f, torch.zeros(4, dtype=DT), lam).solution  # noqa: E731
    lam = torch.tensor(0.9, dtype=DT)
    H = X.T @ X + lam * torch.eye(4, dtype=DT)
    z = torch.linalg.solve(H, X.T @ y)
    torch.testing.assert_close(sol(lam), z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(sol)(lam), -torch.linalg.solve(H, z), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(sol)(lam), -torch.linalg.solve(H, z), rtol=1e-8, atol=1e-12)
    d2 = 2 * torch.linalg.solve(H, torch.linalg.solve(H, z))
    torch.testing.assert_close(torch.func.hessian(lambda l_: sol(l_).sum())(lam), d2.sum(), rtol=1e-7, atol=0)
    lams = torch.tensor([0.1, 1.0, 10.0], dtype=DT)
    torch.testing.assert_close(torch.func.vmap(sol)(lams), torch.stack([sol(v) for v in lams]))
    lam_ = lam.clone().requires_grad_()
    assert gradcheck(sol, (lam_,)) and gradgradcheck(sol, (lam_,))


def test_minimize_unrolled_matches_implicit():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    f = lambda z, lam: 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z ** 2).sum()  # noqa: E731
    lam = torch.tensor(0.9, dtype=DT, requires_grad=True)
    gi = torch.autograd.grad(minimize(f, torch.zeros(4, dtype=DT), lam).solution.sum(), lam)[0]
    gu = torch.autograd.grad(minimize(f, torch.zeros(4, dtype=DT), lam, adjoint=UnrollAdjoint()).solution.sum(),
                             lam)[0]
    torch.testing.assert_close(gu, gi, rtol=1e-6, atol=0)


def test_least_squares_exact_and_gauss_newton():
    t = torch.linspace(0, 1, 15, dtype=DT)
    y = torch.exp(0.7 * t) + 0.05 * torch.sin(7 * t)  # nonzero residual at the optimum
    r = lambda k, y: torch.exp(k * t) - y  # noqa: E731
    sol = lambda y, **kw: least_squares(r, torch.zeros((), dtype=DT), y, **kw).solution  # noqa: E731
    yy = y.clone().requires_grad_()
    (g,) = torch.autograd.grad(sol(yy), yy)
    h, fd = 1e-6, torch.zeros_like(y)
    for i in range(len(y)):
        e = torch.zeros_like(y)
        e[i] = h
        fd[i] = (sol(y + e) - sol(y - e)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-9)
    assert gradcheck(lambda v: sol(v, solver=GaussNewton()), (yy,))
    (g_gn,) = torch.autograd.grad(sol(yy, hessian="gauss_newton"), yy)
    assert not torch.allclose(g_gn, g, rtol=1e-6)  # nonzero residual: GN is only approximate
    y0 = torch.exp(0.7 * t).requires_grad_()  # zero residual: GN is exact
    (g0,) = torch.autograd.grad(sol(y0), y0)
    (g0_gn,) = torch.autograd.grad(sol(y0, hessian="gauss_newton", solver=LevenbergMarquardt()), y0)
    torch.testing.assert_close(g0_gn, g0, rtol=1e-9, atol=1e-12)


def test_lasso_proximal_gradient_matches_active_set_finite_differences():
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(40, 8, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    L = float(torch.linalg.eigvalsh(X.T @ X).max())
    f = lambda z, lam: 0.5 * ((X @ z - y) ** 2).sum()  # noqa: E731
    prox = lambda z, step, lam: prox_l1(z, lam, step)  # noqa: E731
    solve = lambda lam: minimize(f, torch.zeros(8, dtype=DT), lam,  # noqa: E731
                                 solver=ProximalGradient(prox, step=1.0 / L, max_iter=20000)).solution
    lam = torch.tensor(8.0, dtype=DT, requires_grad=True)
    z = solve(lam)
    (g,) = torch.autograd.grad(z.sum(), lam)
    # independent solve on the active set: z_S = (X_Sᵀ X_S)⁻¹ (X_Sᵀ y − λ sign(z_S))
    S = z.detach().abs() > 1e-8
    assert 0 < S.sum() < 8
    sign = torch.sign(z.detach()[S])
    XS = X[:, S]
    active = lambda lam_: torch.linalg.solve(XS.T @ XS, XS.T @ y - lam_ * sign)  # noqa: E731
    torch.testing.assert_close(active(8.0), z.detach()[S], rtol=1e-7, atol=1e-9)
    fd = ((active(8.0 + 1e-5) - active(8.0 - 1e-5)) / 2e-5).sum()
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)
    # the same through custom_root + proximal_gradient_fp around any solver
    @custom_root(proximal_gradient_fp(f, prox, step=1.0 / L), adjoint=ImplicitAdjoint(Dense()))
    def lasso(z0, lam_):
        return z.detach()

    (g2,) = torch.autograd.grad(lasso(torch.zeros(8, dtype=DT), lam).sum(), lam)
    torch.testing.assert_close(g2, fd, rtol=1e-6, atol=1e-9)


def test_box_least_squares_projected_gradient_matches_scipy_finite_differences():
    g = torch.Generator().manual_seed(4)
    A, b = torch.randn(20, 5, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT) * 3
    lo, hi = -0.3, 0.4
    f = lambda z, b: 0.5 * ((A @ z - b) ** 2).sum()  # noqa: E731
    proj = lambda z, b: project_box(z, lo, hi)  # noqa: E731
    solve = lambda b_: minimize(f, torch.zeros(5, dtype=DT), b_, solver=ProjectedGradient(proj)).solution  # noqa: E731
    bb = b.clone().requires_grad_()
    z = solve(bb)
    ref = lambda bv: scipy.optimize.lsq_linear(A.numpy(), bv, bounds=(lo, hi), tol=1e-14).x  # noqa: E731
    np.testing.assert_allclose(z.detach().numpy(), ref(b.numpy()), atol=1e-8)
    (g,) = torch.autograd.grad(z.sum(), bb)
    h = 1e-6
    fd = np.array([(ref(b.numpy() + h * e) - ref(b.numpy() - h * e)).sum() / (2 * h) for e in np.eye(20)])
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-7)
    assert gradcheck(solve, (bb,))


def test_max_iter_raises_with_useful_message():
    a = torch.tensor([2.0, 3.0], dtype=DT)
    with pytest.raises(ConvergenceError) as info:
        root_solve(lambda z, a: z ** 2 - a, torch.full((2,), 10.0, dtype=DT), a, solver=Newton(max_iter=1),
                   batch_ndim=1)
    msg = str(info.value)
    assert "Newton" in msg and "MAX_ITER" in msg and "residual" in msg and "max_iter=1" in msg
    assert "batch indices" in msg and "Hint" in msg
    assert info.value.result is not None


def test_throw_false_flags_per_element_and_nonfinite():
    a = torch.tensor([2.0, float("nan"), 5.0], dtype=DT)
    r = root_solve(lambda z, a: z ** 2 - a, torch.ones(3, dtype=DT), a, batch_ndim=1, throw=False)
    assert r.converged.tolist() == [True, False, True]
    assert r.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    torch.testing.assert_close(r.solution[[0, 2]], a[[0, 2]].sqrt())
    with pytest.raises(ConvergenceError, match="NONFINITE"):
        root_solve(lambda z, a: z ** 2 - a, torch.ones(3, dtype=DT), a, batch_ndim=1)
    r = minimize(lambda z, c: ((z - c) ** 2).sum(-1), torch.zeros(2, 3, dtype=DT),
                 torch.tensor([[1.0, 2, 3], [1, float("inf"), 0]], dtype=DT), batch_ndim=1, throw=False)
    assert r.converged.tolist() == [True, False]
    assert int(r.status[1]) == Status.NONFINITE


def test_singular_adjoint_raises_in_backward():
    # F(z, a) = (z0 - a, 0·z1): the solution exists but ∂_z F is singular
    F = lambda z, a: torch.stack([z[0] - a, 0.0 * z[1]])  # noqa: E731

    @custom_root(F, adjoint=ImplicitAdjoint(linear_solver=Dense()))
    def solve(z0, a):
        return torch.stack([a, torch.zeros_like(a)])

    a = torch.tensor(1.0, dtype=DT, requires_grad=True)
    z = solve(torch.zeros(2, dtype=DT), a)
    with pytest.raises(AdjointSolveError, match="ridge"):
        z.sum().backward()
    for ls in (CG(), Dense()):
        @custom_root(F, adjoint=ImplicitAdjoint(linear_solver=ls))
        def solve2(z0, a):
            return torch.stack([a, torch.zeros_like(a)])
        with pytest.raises(AdjointSolveError):
            solve2(torch.zeros(2, dtype=DT), a).sum().backward()


def test_import_does_not_load_numba_or_triton():
    code = "import sys, optlayers, optlayers.implicit, optlayers.solvers, optlayers.layers; " \
           "bad = [m for m in ('numba', 'triton') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile_smoke():
    fn = torch.compile(lambda a: sqrt_root(a, solver=Newton()), backend="eager")
    a = torch.tensor(4.0, dtype=DT)
    torch.testing.assert_close(fn(a), torch.tensor(2.0, dtype=DT))


def test_start_already_at_the_solution_returns_it_with_correct_gradients():
    """A solver that returns z0 unchanged must not trip autograd (input returned as-is)."""
    from optlayers.implicit import fixed_point, minimize, root_solve

    a = torch.zeros(2, dtype=torch.float64)
    z0 = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(fixed_point(lambda z, a: 0.5 * z + a, z0, a).solution, z0)
    assert torch.equal(root_solve(lambda z, a: z - a, z0, a).solution, z0)
    assert torch.equal(minimize(lambda z, a: ((z - a) ** 2).sum(), z0, a).solution, z0)
    a = a.clone().requires_grad_()
    z = fixed_point(lambda z, a: 0.5 * z + a, z0, a).solution  # z* = 2a
    (g,) = torch.autograd.grad(z.sum(), a)
    torch.testing.assert_close(g, torch.full_like(g, 2.0))

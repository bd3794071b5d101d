"""PDE building blocks: finite differences, residuals, reference solvers, and the collocation solve."""

from __future__ import annotations

import math

import pytest
import torch

from optlayers import ConvergenceError, Status
from optlayers.implicit import ImplicitAdjoint, LevenbergMarquardt
from optlayers.solvers.pde import (
    Burgers,
    DiffusionSorption,
    Fields,
    Grid,
    Heat,
    basis_derivatives,
    burgers_reference,
    diff1,
    diff2,
    diffusion_sorption_reference,
    gather_rows,
    hard_constraint,
    heat_exact,
    reference_solution,
    relative_l2_error,
    sample_coefficients,
    sample_collocation,
    space_time_derivatives,
)
from optlayers.solvers.pde._structured_lm import _partials
from optlayers.solvers.pde.collocation import collocation_residual

F64 = torch.float64
# the default inner tolerance: ‖Jᵀr‖ <= atol + rtol ‖Jᵀr₀‖ with rtol = 1e-9, atol = 1e-12 (float64)
STAT_TOL = 1.1e-9


# --------------------------------------------------------------------------- finite differences
def test_diff_exact_on_low_degree_polynomials() -> None:
    x = torch.linspace(-1, 2, 13, dtype=F64)
    h = float(x[1] - x[0])
    assert torch.allclose(diff1(3 * x ** 2 - x, h), 6 * x - 1, atol=1e-12)
    assert torch.allclose(diff2(x ** 3 - 2 * x ** 2, h), 6 * x - 4, atol=1e-10)
    # along another dimension of a batch
    f = torch.stack([x ** 2, x ** 3], 0).T  # (13, 2)
    assert torch.allclose(diff1(f, h, dim=0)[:, 0], 2 * x, atol=1e-12)


@pytest.mark.parametrize("op,exact", [(diff1, torch.cos), (diff2, lambda x: -torch.sin(x))])
def test_diff_second_order_everywhere(op, exact) -> None:
    errs = []
    for n in (33, 65):
        x = torch.linspace(0, 3, n, dtype=F64)
        errs.append(float((op(torch.sin(x), 3 / (n - 1)) - exact(x)).abs().max()))  # includes the ends
    assert 3.0 < errs[0] / errs[1] < 6.0  # halving h divides the error by ~4


def test_grid_and_basis_derivatives_are_linear() -> None:
    grid = Grid(10, 6, x_min=-1.0, x_max=1.0, t_max=0.5)
    assert grid.dx == pytest.approx(2 / 9) and grid.dt == pytest.approx(0.1) and grid.size == 60
    b = torch.randn(3, 10, 6, 4, dtype=F64)
    d = basis_derivatives(b, grid)
    assert d.shape == (3, 10, 6, 4, 4)
    w = torch.randn(4, dtype=F64)
    u = b @ w
    for q, ref in enumerate(space_time_derivatives(u, grid)):
        assert torch.allclose(d[..., q, :] @ w, ref, atol=1e-10)
    with pytest.raises(ValueError, match="nx must be an int >= 4"):
        Grid(3, 6)
    with pytest.raises(ValueError, match="t_max > t_min"):
        Grid(5, 5, t_max=0.0)


# --------------------------------------------------------------------------- residuals and references
def test_heat_exact_solution_has_second_order_fd_residual() -> None:
    pde = Heat()
    a = torch.tensor([[1.0, -0.5, 0.25]], dtype=F64)
    res = []
    for n in (24, 48):
        grid = pde.grid(n, n)
        f = Fields(*space_time_derivatives(heat_exact(pde, a, grid), grid))
        res.append(float(pde.interior(f)[:, 1:-1, 1:].abs().max()))
    assert res[1] < res[0] / 3
    grid = pde.grid(16, 8)
    u = heat_exact(pde, a, grid)
    assert torch.allclose(u[..., 0], pde.initial_condition(a, grid.coords()[0]))


def test_reference_solvers_converge_and_satisfy_the_pde() -> None:
    a = sample_coefficients(2, generator=torch.Generator().manual_seed(0))
    for pde, solver in ((Burgers(), burgers_reference), (DiffusionSorption(), diffusion_sorption_reference)):
        grid = pde.grid(32, 12)
        u = solver(pde, a, grid, nx_fine=257)
        u_fine = solver(pde, a, grid, nx_fine=513)
        assert float(relative_l2_error(u, u_fine).max()) < 1e-3
        assert torch.allclose(u[..., 0], pde.initial_condition(a, grid.coords()[0]), atol=1e-12)
        f = Fields(*space_time_derivatives(u_fine, grid))
        scale = float(f.u_t[:, 1:-1, 1:].abs().mean())
        assert float(pde.interior(f)[:, 1:-1, 1:].abs().mean()) < 0.2 * scale * (pde.t_max if
                                                                              isinstance(pde, DiffusionSorption) else 1)
    ds = DiffusionSorption()
    u = reference_solution(ds, a, ds.grid(16, 6), nx_fine=129)
    assert torch.allclose(u[:, 0, 1:], torch.ones(2, 5, dtype=F64))  # u(0, t) = 1
    assert float(u[:, -1].abs().max()) < 0.01  # u(1, t) = D u_x(1, t) ≈ 0
    with pytest.raises(TypeError, match="no reference solver"):
        reference_solution(object(), a, ds.grid(16, 6))  # type: ignore[arg-type]


def test_diffusion_sorption_constants_and_closed_form_partials() -> None:
    pde = DiffusionSorption()
    assert float(pde.retardation(torch.tensor(1.0, dtype=F64))) == pytest.approx(3.15691, rel=1e-5)
    f = torch.rand(3, 40, 4, dtype=F64) - 0.2
    for p in (pde, Burgers()):
        r, d, pairs, _ = _partials(p.interior, f, True)
        r2, d2, pairs2 = p.interior_partials(Fields(*f.unbind(-1)))
        H, H2 = torch.zeros(3, 40, 4, 4, dtype=F64), torch.zeros(3, 40, 4, 4, dtype=F64)
        for a_, b_, h in pairs:
            H[..., a_, b_] = h
        for a_, b_, h in pairs2:
            H2[..., a_, b_] = h
        assert torch.allclose(r, r2) and torch.allclose(d, d2, rtol=1e-10) and torch.allclose(H, H2, rtol=1e-9)
    with pytest.raises(ValueError, match="porosity"):
        DiffusionSorption(porosity=1.5)


# --------------------------------------------------------------------------- collocation solve
def _rows(pde, grid: Grid, *, S: int = 3, K: int = 2, N: int = 5, n_points: int = 25, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, T = grid.mesh()
    smooth = torch.stack([torch.ones_like(X), X, torch.sin(math.pi * X), X * T / grid.t_max,
                          torch.cos(2 * X + T / grid.t_max)], -1)[..., :N]
    basis = smooth + 0.1 * torch.randn(S, grid.nx, grid.nt, N, generator=g, dtype=F64)
    a = sample_coefficients(S, generator=g)
    u0 = pde.initial_condition(a, grid.coords()[0])
    regions = torch.zeros(K, grid.nx, grid.nt, dtype=torch.bool)
    for k, (lo, hi) in enumerate(((0, grid.nx // 2), (grid.nx // 2, grid.nx))[:K] if K == 2 else ((0, grid.nx),)):
        regions[k, lo:hi] = True
    colloc = sample_collocation(grid, regions, n_points, generator=g)
    return basis, u0, colloc


@pytest.mark.parametrize("pde", [Heat(), Burgers(nu=0.05), DiffusionSorption()], ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("step", ["newton", "gauss_newton"])
def test_every_problem_meets_its_stationarity_tolerance(pde, step: str) -> None:
    grid = pde.grid(16, 10)
    basis, u0, colloc = _rows(pde, grid)
    rows = gather_rows(basis, u0, colloc, grid)
    res = hard_constraint(pde, rows, step=step, solver=LevenbergMarquardt(damping=1e-6, rtol=1e-9, max_iter=300))
    assert res.solution.shape == (3, 2, 5)
    assert bool(res.converged.all()) and bool((res.status == Status.SUCCESS).all())
    assert float(res.aux.stationarity.max()) <= STAT_TOL
    # the constraint is a least-squares projection: residuals are reported, not zero
    assert bool((res.aux.pde_rms > 0).all()) and res.aux.ic_rms.shape == (3, 2)
    # every problem is independent: solving one alone gives the same coefficients
    one = gather_rows(basis[1:2], u0[1:2], colloc.select(1, 2), grid)
    alone = hard_constraint(pde, one, step=step, solver=LevenbergMarquardt(damping=1e-6, rtol=1e-12, max_iter=300))
    assert torch.allclose(alone.solution[0, 0], res.solution[1, 1], rtol=1e-6, atol=1e-8)


def test_linear_problem_matches_regularized_least_squares() -> None:
    pde = Heat()
    grid = pde.grid(12, 8)
    basis, u0, colloc = _rows(pde, grid, S=2, K=1)
    rows = gather_rows(basis, u0, colloc, grid)
    res = hard_constraint(pde, rows, ridge=1e-3)
    residual = collocation_residual(pde, rows, ridge=1e-3)
    zero = torch.zeros(2, 1, 5, dtype=F64)
    r0 = residual(zero, rows.tensors)[:, 0]  # affine residual: r(w) = A w + r(0)
    A = torch.stack([residual(e.expand(2, 1, 5), rows.tensors)[:, 0] - r0 for e in torch.eye(5, dtype=F64)], -1)
    w_ls = torch.linalg.lstsq(A, -r0.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(res.solution[:, 0], w_ls, rtol=1e-8, atol=1e-10)


def _outer_loss(pde, grid, basis, u0, colloc, target, **kw):
    res = hard_constraint(pde, gather_rows(basis, u0, colloc, grid),
                          solver=LevenbergMarquardt(damping=1e-6, rtol=1e-12, atol=1e-14, max_iter=300), **kw)
    u = torch.einsum("sxtn,skn->skxt", basis, res.solution)
    return (u * target).sum() + (u ** 3).mean()


@pytest.mark.parametrize("pde", [Burgers(nu=0.05), DiffusionSorption()], ids=lambda p: type(p).__name__)
def test_exact_implicit_gradient_matches_central_differences(pde) -> None:
    grid = pde.grid(14, 8)
    basis, u0, colloc = _rows(pde, grid, S=2, N=4)
    target = torch.randn(2, 2, 14, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    b = basis.clone().requires_grad_(True)
    grads = {}
    for mode, kw in {"exact": {}, "adjoint": {"adjoint": ImplicitAdjoint()},
                     "gauss_newton": {"hessian": "gauss_newton"}}.items():
        (grads[mode],) = torch.autograd.grad(_outer_loss(pde, grid, b, u0, colloc, target, **kw), b)
    gen = torch.Generator().manual_seed(4)
    eps = 1e-6
    for _ in range(2):
        v = torch.randn(basis.shape, generator=gen, dtype=F64)
        with torch.no_grad():
            fd = (_outer_loss(pde, grid, basis + eps * v, u0, colloc, target)
                  - _outer_loss(pde, grid, basis - eps * v, u0, colloc, target)) / (2 * eps)
        for mode in ("exact", "adjoint"):
            assert abs(float((grads[mode] * v).sum() - fd)) <= 1e-5 * abs(float(fd)), mode
    # Gauss–Newton mode is not exact on a nonlinear residual that is not zero at the solution
    rel = float((grads["gauss_newton"] - grads["exact"]).norm() / grads["exact"].norm())
    assert rel > 1e-4


def test_gauss_newton_gradient_is_exact_for_a_linear_residual() -> None:
    pde = Heat()
    grid = pde.grid(12, 8)
    basis, u0, colloc = _rows(pde, grid, S=2, N=4)
    target = torch.randn(2, 2, 12, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    b = basis.clone().requires_grad_(True)
    (g_ex,) = torch.autograd.grad(_outer_loss(pde, grid, b, u0, colloc, target), b)
    (g_gn,) = torch.autograd.grad(_outer_loss(pde, grid, b, u0, colloc, target, hessian="gauss_newton"), b)
    assert torch.allclose(g_ex, g_gn, rtol=1e-7, atol=1e-10)


def test_gradcheck_small_instance() -> None:
    pde = Burgers(nu=0.05)
    grid = pde.grid(8, 6)
    basis, u0, colloc = _rows(pde, grid, S=1, K=1, N=3, n_points=12)
    solver = LevenbergMarquardt(damping=1e-6, rtol=1e-13, atol=1e-15, max_iter=300)

    def f(b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = gather_rows(b, target, colloc, grid)
        return hard_constraint(pde, rows, solver=solver).solution

    inputs = (basis.clone().requires_grad_(True), u0.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_coupling_rows_join_problems_and_are_differentiable() -> None:
    pde = Burgers(nu=0.05)
    grid = pde.grid(12, 8)
    basis, u0, colloc = _rows(pde, grid, S=2, N=4)
    derivs = basis_derivatives(basis, grid)
    rows = gather_rows(basis, u0, colloc, grid)
    free = hard_constraint(pde, rows)
    # continuity of u between the two problems on the line x index 5..6
    pts = torch.arange(5 * grid.nt, 7 * grid.nt)
    vals = derivs.reshape(2, -1, 4, 4)[:, pts, 0]  # (S, I, N)
    C = (torch.stack([vals, -vals], 2) * 3.0).requires_grad_(True)  # (S, I, K=2, N)
    joint = hard_constraint(pde, rows, coupling=C)
    assert bool(joint.converged.all()) and float(joint.aux.stationarity.max()) <= STAT_TOL
    jump = lambda w: float(torch.einsum("sin,sn->si", vals, w[:, 0] - w[:, 1]).abs().max())  # noqa: E731
    assert jump(joint.solution.detach()) < jump(free.solution)
    (g,) = torch.autograd.grad(joint.solution.pow(2).sum(), C)
    assert torch.isfinite(g).all() and float(g.abs().max()) > 0


def test_failure_semantics() -> None:
    pde = Burgers(nu=0.05)
    grid = pde.grid(12, 8)
    basis, u0, colloc = _rows(pde, grid)
    rows = gather_rows(basis, u0, colloc, grid)
    with pytest.raises(ConvergenceError, match="hard_constraint.*MAX_ITER.*failing batch indices"):
        hard_constraint(pde, rows, solver=LevenbergMarquardt(max_iter=1))
    res = hard_constraint(pde, rows, solver=LevenbergMarquardt(max_iter=1), throw=False)
    assert not bool(res.converged.any()) and bool((res.status == Status.MAX_ITER).all())
    bad = gather_rows(basis, u0.clone().fill_(float("nan")), colloc, grid)
    res = hard_constraint(pde, bad, throw=False)
    assert bool((res.status == Status.NONFINITE).all())
    with pytest.raises(ValueError, match="hessian"):
        hard_constraint(pde, rows, hessian="bfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        hard_constraint(pde, rows, step="newtonian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fewer than n_points"):
        sample_collocation(grid, torch.ones(1, 12, 8, dtype=torch.bool), 10_000)

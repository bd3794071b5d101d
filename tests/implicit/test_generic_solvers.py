"""Tests of the batched generic solvers in ``optlayers.implicit.solvers``."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import scipy.optimize as so
import torch

from optlayers._result import Status
from optlayers.implicit.solvers import (
    LBFGS,
    Anderson,
    Broyden,
    GaussNewton,
    GradientDescent,
    LevenbergMarquardt,
    Newton,
    Picard,
    ProjectedGradient,
    ProximalGradient,
)

B = 3
DTYPES = [torch.float64, torch.float32]


def acc(dtype: torch.dtype) -> float:
    """Accuracy expected of a solution at default tolerances."""
    return 1e-9 if dtype == torch.float64 else 2e-4


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- problems
class Root:
    """``F(z) = A(z - z*) + ½(tanh z - tanh z*) + 0.1 (z - z*)³`` with root ``z*``."""

    n = 4

    def __init__(self, dtype: torch.dtype, idx: list[int] | None = None):
        A = 3 * torch.eye(self.n, dtype=torch.float64) + 0.5 * _rand(B, self.n, self.n, seed=1)
        zs = _rand(B, self.n, seed=2)
        idx = list(range(B)) if idx is None else idx
        self.A, self.zs = A[idx].to(dtype), zs[idx].to(dtype)

    def F(self, z: torch.Tensor) -> torch.Tensor:
        e = z - self.zs
        return (self.A @ e.unsqueeze(-1)).squeeze(-1) + 0.5 * (torch.tanh(z) - torch.tanh(self.zs)) + 0.1 * e**3

    def T(self, z: torch.Tensor) -> torch.Tensor:
        """A contraction (Lipschitz <= 0.9) with fixed point ``z*``."""
        W = self.A - 3 * torch.eye(self.n, dtype=z.dtype)
        W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)[:, None, None]
        return self.zs + (W @ (z - self.zs).unsqueeze(-1)).squeeze(-1) + 0.1 * (torch.sin(z) - torch.sin(self.zs))

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """Strongly convex quadratic ``½ zᵀQz - bᵀz`` (condition number < 10)."""
        Q = self.Q()
        return 0.5 * (z * (Q @ z.unsqueeze(-1)).squeeze(-1)).sum(-1) - (self.zs * z).sum(-1)

    def Q(self) -> torch.Tensor:
        M = self.A - 3 * torch.eye(self.n, dtype=self.A.dtype)
        return 2 * torch.eye(self.n, dtype=self.A.dtype) + M.transpose(-1, -2) @ M

    def f_min(self) -> torch.Tensor:
        return torch.linalg.solve(self.Q(), self.zs)

    def z0(self) -> torch.Tensor:
        return torch.zeros_like(self.zs)


class Fit:
    """Gaussian-bump fit ``r(z) = z₀ exp(-(t - z₁)²) + z₂ - y`` (m = 10, n = 3)."""

    t = torch.linspace(-2, 2, 10, dtype=torch.float64)

    def __init__(self, dtype: torch.dtype, noise: float = 0.05, idx: list[int] | None = None):
        ztrue = torch.tensor([[2.0, 0.3, 0.5], [1.0, -0.5, 0.1], [3.0, 0.0, -0.3]], dtype=torch.float64)
        y = self.model(ztrue, self.t) + noise * _rand(B, 10, seed=3)
        idx = list(range(B)) if idx is None else idx
        self.y, self.ztrue, self.tt = y[idx].to(dtype), ztrue[idx].to(dtype), self.t.to(dtype)

    @staticmethod
    def model(z, t):
        return z[:, :1] * torch.exp(-((t - z[:, 1:2]) ** 2)) + z[:, 2:]

    def r(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z, self.tt) - self.y

    def z0(self) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0, 0.0]] * self.y.shape[0], dtype=self.y.dtype)

    def scipy(self) -> np.ndarray:
        t = self.t.numpy()
        return np.stack([
            so.least_squares(lambda x, yi=yi: x[0] * np.exp(-((t - x[1]) ** 2)) + x[2] - yi, z0, xtol=1e-15,
                             ftol=1e-15, gtol=1e-15).x
            for yi, z0 in zip(self.y.double().numpy(), self.z0().double().numpy(), strict=True)
        ])


def _scipy_rosenbrock(a: float, z0: np.ndarray) -> np.ndarray:
    def fun(x):
        return (a - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, np.array(
            [-2 * (a - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])

    return so.minimize(fun, z0, jac=True, method="BFGS", options={"gtol": 1e-10}).x


def rosenbrock(a: torch.Tensor, b: float = 100.0):
    return lambda z: (a - z[:, 0]) ** 2 + b * (z[:, 1] - z[:, 0] ** 2) ** 2


def run(solver, problem, z0=None, **kw):
    """Run ``solver`` on the matching method of a :class:`Root` / :class:`Fit` problem."""
    z0 = problem.z0() if z0 is None else z0
    if isinstance(solver, (Newton, Broyden)):
        return solver.run_root(problem.F, z0, **kw)
    if isinstance(solver, (Picard, Anderson)):
        return solver.run_fixed_point(problem.T, z0, **kw)
    if isinstance(solver, (GaussNewton, LevenbergMarquardt)):
        return solver.run_least_squares(problem.r, z0, **kw)
    return solver.run_minimize(problem.f, z0, **kw)


def _make(kind: str, dtype: torch.dtype, idx: list[int] | None = None):
    return Fit(dtype, idx=idx) if kind == "lsq" else Root(dtype, idx=idx)


ALL = [
    ("root", Newton()), ("root", Broyden(init="jacobian")), ("root", Newton(line_search=False)),
    ("root", Picard()), ("root", Anderson()), ("root", GradientDescent()), ("root", LBFGS()),
    ("root", LBFGS(line_search="armijo")), ("root", ProximalGradient(lambda v, s: v)),
    ("root", ProjectedGradient(lambda v: v.clamp(-5, 5))), ("lsq", GaussNewton()), ("lsq", LevenbergMarquardt()),
]
IDS = [type(s).__name__ + ("" if i not in (2, 7) else "-variant") for i, (_, s) in enumerate(ALL)]


# ----------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", [Newton(), Newton(line_search=False), Broyden(init="jacobian")], ids=str)
def test_root_known_solution(solver, dtype):
    p = Root(dtype)
    res = solver.run_root(p.F, p.z0())
    assert res.converged.all() and (res.status == Status.SUCCESS).all()
    assert res.solution.dtype == dtype and res.iterations.dtype == torch.int64
    torch.testing.assert_close(res.solution, p.zs, atol=acc(dtype), rtol=0)
    assert (res.residual <= torch.linalg.vector_norm(p.F(p.z0()), dim=-1) * 1e-4).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_broyden_identity_init_on_fixed_point_residual(dtype):
    p = Root(dtype)
    res = Broyden().run_root(lambda z: p.T(z) - z, p.z0())
    assert res.converged.all()
    torch.testing.assert_close(res.solution, p.zs, atol=acc(dtype), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_picard_and_anderson_on_contraction(dtype):
    p = Root(dtype)
    pic = Picard().run_fixed_point(p.T, p.z0())
    aa = Anderson().run_fixed_point(p.T, p.z0())
    damped = Picard(damping=0.7).run_fixed_point(p.T, p.z0())
    for res in (pic, aa, damped):
        assert res.converged.all()
        torch.testing.assert_close(res.solution, p.zs, atol=10 * acc(dtype), rtol=0)
    assert (aa.iterations < pic.iterations).all()
    assert (Anderson(safeguard=False, memory=2).run_fixed_point(p.T, p.z0()).converged).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", [GradientDescent(), GradientDescent(step=0.1), LBFGS(), LBFGS(line_search="armijo")],
                         ids=str)
def test_minimize_quadratic(solver, dtype):
    p = Root(dtype)
    res = solver.run_minimize(p.f, p.z0())
    assert res.converged.all()
    torch.testing.assert_close(res.solution, p.f_min(), atol=acc(dtype), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("line_search", ["wolfe", "armijo"])
def test_lbfgs_rosenbrock(line_search, dtype):
    a = torch.tensor([1.0, 1.5, 0.5], dtype=dtype)
    z0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, 2.0]], dtype=dtype)
    res = LBFGS(line_search=line_search).run_minimize(rosenbrock(a), z0)
    assert res.converged.all()
    ref = np.stack([_scipy_rosenbrock(ai, zi) for ai, zi in zip(a.double().numpy(), z0.double().numpy(), strict=True)])
    closed = torch.stack([a, a**2], -1)
    torch.testing.assert_close(res.solution, closed, atol=10 * acc(dtype), rtol=0)
    np.testing.assert_allclose(res.solution.double().numpy(), ref, atol=max(1e-6, 10 * acc(dtype)))


def test_gradient_descent_mild_rosenbrock():
    a = torch.tensor([0.8, 0.6, 0.4], dtype=torch.float64)
    res = GradientDescent().run_minimize(rosenbrock(a, b=2.0), torch.zeros(B, 2, dtype=torch.float64))
    assert res.converged.all()
    torch.testing.assert_close(res.solution, torch.stack([a, a**2], -1), atol=1e-8, rtol=0)


@functools.lru_cache
def _lasso_reference(lam: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Lasso data and exact solutions: ISTA finds the support, a linear solve on it the values."""
    A, b = _rand(B, 30, 5, seed=4) / 30**0.5, _rand(B, 30, seed=5) / 30**0.5
    An, bn, ref = A.numpy(), b.numpy(), []
    for i in range(B):
        L, x = np.linalg.norm(An[i], 2) ** 2, np.zeros(5)
        for _ in range(3000):
            v = x - An[i].T @ (An[i] @ x - bn[i]) / L
            x = np.sign(v) * np.maximum(np.abs(v) - lam / L, 0)
        S, sign = np.abs(x) > 1e-8, np.sign(x)
        x = np.zeros(5)
        x[S] = np.linalg.solve(An[i][:, S].T @ An[i][:, S], An[i][:, S].T @ bn[i] - lam * sign[S])
        g = An[i].T @ (An[i] @ x - bn[i])  # KKT: g_S = -λ sign(x_S), |g_i| <= λ off the support
        assert np.allclose(g[S], -lam * sign[S], atol=1e-12) and (np.abs(g[~S]) <= lam).all()
        ref.append(x)
    return A, b, np.stack(ref)


def _lasso(dtype):
    lam = 0.05
    A, b, ref = _lasso_reference(lam)
    f = lambda z: 0.5 * ((A.to(dtype) @ z.unsqueeze(-1)).squeeze(-1) - b.to(dtype)).pow(2).sum(-1)  # noqa: E731
    soft = lambda v, eta: torch.sign(v) * (v.abs() - lam * eta).clamp_min(0)  # noqa: E731
    return f, soft, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acceleration", [True, False])
def test_proximal_gradient_lasso(acceleration, dtype):
    f, soft, ref = _lasso(dtype)
    z0 = torch.zeros(B, 5, dtype=dtype)
    solver = ProximalGradient(soft, acceleration=acceleration)
    res = solver.run_minimize(f, z0, prox=soft)
    assert res.converged.all()
    np.testing.assert_allclose(res.solution.double().numpy(), ref, atol=10 * acc(dtype))
    assert (res.solution == 0).any()  # sparsity is exact
    np.testing.assert_allclose(solver.run_minimize(f, z0).solution.double().numpy(), ref, atol=10 * acc(dtype))
    gd = GradientDescent().run_minimize(f, z0, prox=soft)  # GD with a prox is proximal gradient
    np.testing.assert_allclose(gd.solution.double().numpy(), ref, atol=10 * acc(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [None, 0.02])
def test_projected_gradient_box_least_squares(step, dtype):
    A, b, lo, hi = _rand(B, 12, 5, seed=6), _rand(B, 12, seed=7), -0.2, 0.3
    f = lambda z: 0.5 * ((A.to(dtype) @ z.unsqueeze(-1)).squeeze(-1) - b.to(dtype)).pow(2).sum(-1)  # noqa: E731
    box = lambda v: v.clamp(lo, hi)  # noqa: E731
    res = ProjectedGradient(box, step=step).run_minimize(f, torch.zeros(B, 5, dtype=dtype),
                                                         prox=lambda v, eta: box(v))
    assert res.converged.all()
    ref = np.stack([so.lsq_linear(A[i].numpy(), b[i].numpy(), bounds=(lo, hi), method="bvls", tol=1e-15).x
                    for i in range(B)])
    np.testing.assert_allclose(res.solution.double().numpy(), ref, atol=10 * acc(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", [GaussNewton(), GaussNewton(line_search=False), LevenbergMarquardt()], ids=str)
def test_least_squares_vs_scipy(solver, dtype):
    p = Fit(dtype)
    res = solver.run_least_squares(p.r, p.z0())
    assert res.converged.all() and (res.status == Status.SUCCESS).all()
    np.testing.assert_allclose(res.solution.double().numpy(), p.scipy(), atol=10 * acc(dtype))
    exact = Fit(dtype, noise=0.0)  # zero residual: converged by ‖r‖ <= atol, solution exact
    res = solver.run_least_squares(exact.r, exact.z0())
    assert res.converged.all()
    torch.testing.assert_close(res.solution, exact.ztrue, atol=acc(dtype) * 10, rtol=0)


# ----------------------------------------------------------------------------- batching and failures
@pytest.mark.parametrize(("kind", "solver"), ALL, ids=IDS)
def test_per_element_independence(kind, solver):
    full = _make(kind, torch.float64)
    z0 = full.z0().clone()
    z0[0] = z0[0] + 3.0  # a bad start for element 0 only
    res = run(solver, full, z0)
    alone = run(solver, _make(kind, torch.float64, idx=[1, 2]), z0[1:])
    torch.testing.assert_close(res.solution[1:], alone.solution, atol=1e-13, rtol=0)
    assert torch.equal(res.iterations[1:], alone.iterations)
    assert res.converged[1:].all()


@pytest.mark.parametrize(("kind", "solver"), ALL, ids=IDS)
def test_nan_start_only_flags_that_element(kind, solver):
    p = _make(kind, torch.float64)
    z0 = p.z0().clone()
    z0[1, 0] = float("nan")
    res = run(solver, p, z0)
    assert res.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    assert res.converged.tolist() == [True, False, True]
    assert torch.isfinite(res.solution[[0, 2]]).all()


@pytest.mark.parametrize(("kind", "solver"), ALL, ids=IDS)
def test_max_iter_one(kind, solver):
    res = run(type(solver)(**{**_fields(solver), "max_iter": 1}), _make(kind, torch.float64))
    assert (res.status == Status.MAX_ITER).all() and not res.converged.any()
    assert (res.iterations == 1).all()


@pytest.mark.parametrize(("kind", "solver"), ALL, ids=IDS)
def test_check_every_none_runs_exactly_max_iter(kind, solver):
    p = _make(kind, torch.float64)
    ref = run(solver, p)
    # One line-search trial per iteration without synchronisation: allow for rejected trials.
    slack = 2 * int(ref.iterations.max()) + 10 if isinstance(solver, (GradientDescent, LBFGS)) else 5
    max_iter = int(ref.iterations.max()) + slack
    fixed = run(type(solver)(**{**_fields(solver), "max_iter": max_iter, "check_every": None}), p)
    assert (fixed.iterations == max_iter).all()
    assert fixed.converged.all() and (fixed.status == Status.SUCCESS).all()
    torch.testing.assert_close(fixed.solution, ref.solution, atol=1e-8, rtol=0)


@pytest.mark.parametrize(("kind", "solver"), [ALL[0], ALL[4], ALL[6], ALL[11]], ids=str)
def test_check_every_k_checks_periodically(kind, solver):
    p = _make(kind, torch.float64)
    ref = run(solver, p)
    sparse = run(type(solver)(**{**_fields(solver), "check_every": 4}), p)
    assert sparse.converged.all()
    assert torch.equal(sparse.iterations, ref.iterations)  # frozen per element at convergence
    torch.testing.assert_close(sparse.solution, ref.solution, atol=0, rtol=0)


def _fields(solver) -> dict:
    return {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver) if f.init and f.name != "_"}


def test_nonfinite_during_iterations_is_reported():
    # T blows up for element 0 only: z -> 2 z + 1 diverges to inf.
    scale = torch.tensor([[2.0], [0.5], [0.5]], dtype=torch.float64)
    res = Picard(max_iter=5000).run_fixed_point(lambda z: scale * z + 1.0, torch.zeros(B, 2, dtype=torch.float64))
    assert res.status.tolist() == [Status.NONFINITE, Status.SUCCESS, Status.SUCCESS]
    assert torch.isfinite(res.solution).all()
    torch.testing.assert_close(res.solution[1:], torch.full((2, 2), 2.0, dtype=torch.float64))


def test_callback_receives_iteration_and_residual():
    p = Root(torch.float64)
    seen = []
    res = Newton().run_root(p.F, p.z0(), callback=lambda k, r: seen.append((k, r.clone())))
    assert [k for k, _ in seen] == list(range(1, int(res.iterations.max()) + 1))
    assert all(r.shape == (B,) for _, r in seen)
    torch.testing.assert_close(seen[-1][1], res.residual)


def test_already_converged_start_takes_no_iteration():
    p = Root(torch.float64)
    res = Newton().run_root(p.F, p.zs.clone())
    assert res.converged.all() and (res.iterations == 0).all()


# ----------------------------------------------------------------------------- unrolled differentiation
def test_unrolled_picard_matches_closed_form_derivative():
    W = 0.6 * _rand(B, 3, 3, seed=8) / torch.linalg.matrix_norm(_rand(B, 3, 3, seed=8), ord=2)[:, None, None]
    theta = _rand(B, 3, seed=9).requires_grad_()
    w = _rand(B, 3, seed=10)
    res = Picard().run_fixed_point(lambda z: (W @ z.unsqueeze(-1)).squeeze(-1) + theta,
                                   torch.zeros(B, 3, dtype=torch.float64))
    (grad,) = torch.autograd.grad((w * res.solution).sum(), theta)
    eye = torch.eye(3, dtype=torch.float64)
    expected = torch.linalg.solve((eye - W).transpose(-1, -2), w)
    torch.testing.assert_close(grad, expected, atol=1e-8, rtol=0)


def test_unrolled_newton_and_lbfgs_match_closed_form_derivative():
    p = Root(torch.float64)
    theta = p.zs.clone().requires_grad_()
    Q = p.A.transpose(-1, -2) @ p.A
    res = Newton().run_root(lambda z: (Q @ z.unsqueeze(-1)).squeeze(-1) - theta, p.z0())
    (grad,) = torch.autograd.grad(res.solution.sum(), theta)
    torch.testing.assert_close(grad, torch.linalg.solve(Q, torch.ones(B, 4, dtype=torch.float64)), atol=1e-8, rtol=0)
    res = LBFGS().run_minimize(lambda z: 0.5 * (z * (Q @ z.unsqueeze(-1)).squeeze(-1)).sum(-1) - (theta * z).sum(-1),
                               p.z0())
    (grad,) = torch.autograd.grad(res.solution.sum(), theta)
    torch.testing.assert_close(grad, torch.linalg.solve(Q, torch.ones(B, 4, dtype=torch.float64)), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("factory", "field"), [
    (lambda: Newton(max_iter=0), "max_iter"),
    (lambda: Newton(rtol=-1.0), "rtol"),
    (lambda: Picard(atol=float("nan")), "atol"),
    (lambda: Broyden(check_every=0), "check_every"),
    (lambda: Broyden(init="eye"), "init"),
    (lambda: Newton(line_search="yes"), "line_search"),
    (lambda: Picard(damping=1.5), "damping"),
    (lambda: Anderson(memory=0), "memory"),
    (lambda: Anderson(mixing=0.0), "mixing"),
    (lambda: Anderson(ridge=-1.0), "ridge"),
    (lambda: GradientDescent(step=-0.1), "step"),
    (lambda: LBFGS(line_search="strong"), "line_search"),
    (lambda: LBFGS(memory=True), "memory"),
    (lambda: ProximalGradient(3.0), "prox"),
    (lambda: ProjectedGradient(None), "projection"),
    (lambda: ProximalGradient(lambda v, s: v, step=0.0), "step"),
    (lambda: LevenbergMarquardt(damping=0.0), "damping"),
    (lambda: GaussNewton(max_iter=2.5), "max_iter"),
])
def test_validation_errors_name_the_field(factory, field):
    with pytest.raises(ValueError, match=field):
        factory()


def test_configs_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        Newton(1e-8)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Newton().max_iter = 3  # type: ignore[misc]
    assert ProximalGradient(abs, step=0.1).step == 0.1


def test_bad_shapes_raise():
    p = Root(torch.float64)
    with pytest.raises(ValueError, match="z0"):
        Newton().run_root(p.F, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="F"):
        Newton().run_root(lambda z: z[:, :2], p.z0())
    with pytest.raises(ValueError, match="objective"):
        LBFGS().run_minimize(lambda z: z, p.z0())
    with pytest.raises(ValueError, match="prox"):
        LBFGS().run_minimize(p.f, p.z0(), prox=lambda v, s: v)

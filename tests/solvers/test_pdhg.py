"""PDHG / linprog: accuracy against HiGHS, restarts, polishing, certificates, batching, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.optimize import linprog as scipy_linprog

from optlayers._result import ConvergenceError, Status
from optlayers.solvers.lp import PDHG, AdaptivePDHG, LPGradient, diag_qp, linprog

T = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")


def random_lp(seed: int, m: int = 30, n: int = 50):
    """A feasible, bounded LP: box bounds, inequalities with slack at a known point, equalities."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n)
    A = rng.standard_normal((m, n))
    b = A @ x + rng.uniform(0.1, 1.0, m)
    Ae = rng.standard_normal((m // 3, n))
    be = Ae @ x
    c = rng.standard_normal(n)
    return c, A, b, Ae, be


def rel_checks(res, c, A, b, Ae, be, ref):
    x = res.x.numpy()
    fun = float(res.fun)
    gap = abs(fun - ref.fun) / (1 + abs(ref.fun))
    rp = np.linalg.norm(np.concatenate([np.maximum(A @ x - b, 0), Ae @ x - be])) / (1 + np.linalg.norm(np.r_[b, be]))
    rd = float(res.aux.dual_residual) / (1 + np.linalg.norm(c))
    return gap, rp, rd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_lp_matches_highs(seed):
    c, A, b, Ae, be = random_lp(seed)
    ref = scipy_linprog(c, A, b, Ae, be, bounds=(0, 2), method="highs")
    res = linprog(T(c), T(A), T(b), T(Ae), T(be), bounds=(0, 2))
    assert res.success and int(res.status) == Status.SUCCESS
    gap, rp, rd = rel_checks(res, c, A, b, Ae, be, ref)
    assert gap <= 1e-6 and rp <= 1e-6 and rd <= 1e-6
    # polishing: primal violation at most 1e-9
    x = res.x.numpy()
    viol = max(np.max(A @ x - b), np.abs(Ae @ x - be).max(), np.max(-x), np.max(x - 2))
    assert bool(res.aux.polished) and viol <= 1e-9
    # duals in SciPy's sign convention
    assert np.allclose(res.aux.ineqlin.numpy(), ref.ineqlin.marginals, atol=1e-5)
    assert np.allclose(res.aux.eqlin.numpy(), ref.eqlin.marginals, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_pdhg_random_lp_matches_highs(seed):
    c, A, b, Ae, be = random_lp(seed)
    ref = scipy_linprog(c, A, b, Ae, be, bounds=(0, 2), method="highs")
    res = linprog(T(c), T(A), T(b), T(Ae), T(be), bounds=(0, 2), solver=AdaptivePDHG())
    assert res.success and int(res.status) == Status.SUCCESS
    gap, rp, rd = rel_checks(res, c, A, b, Ae, be, ref)
    assert gap <= 1e-6 and rp <= 1e-6 and rd <= 1e-6
    assert np.allclose(res.aux.ineqlin.numpy(), ref.ineqlin.marginals, atol=1e-5)
    assert np.allclose(res.aux.eqlin.numpy(), ref.eqlin.marginals, atol=1e-5)


def test_adaptive_pdhg_plain_scheme_and_constant_step():
    """The paper's scheme alone (no restarts) and the full-spectrum step also reach HiGHS's optimum."""
    c, A, b, Ae, be = random_lp(2, 12, 20)
    ref = scipy_linprog(c, A, b, Ae, be, bounds=(0, 2), method="highs")
    for solver in (AdaptivePDHG(restart="none", rtol=1e-7, max_iter=50_000, polish=False),
                   AdaptivePDHG(step="constant", rtol=1e-7, polish=False)):
        res = linprog(T(c), T(A), T(b), T(Ae), T(be), bounds=(0, 2), solver=solver)
        assert abs(float(res.fun) - ref.fun) <= 1e-6 * (1 + abs(ref.fun))
    # the same problem batched, and with a sparse matrix: one solve per element, same answers
    res_b = linprog(T(np.stack([c, -c])), T(A), T(b), T(Ae), T(be), bounds=(0, 2), solver=AdaptivePDHG())
    res_s = linprog(T(np.stack([c, -c])), sp.csr_matrix(A), T(b), sp.csr_matrix(Ae), T(be), bounds=(0, 2),
                    solver=AdaptivePDHG())
    ref2 = scipy_linprog(-c, A, b, Ae, be, bounds=(0, 2), method="highs")
    assert abs(float(res_b.fun[0]) - ref.fun) <= 1e-6 * (1 + abs(ref.fun))
    assert abs(float(res_b.fun[1]) - ref2.fun) <= 1e-6 * (1 + abs(ref2.fun))
    assert torch.allclose(res_s.fun, res_b.fun, atol=1e-6)


def test_adaptive_pdhg_config_and_failures():
    with pytest.raises(ValueError, match="nu"):
        AdaptivePDHG(nu=1.0)
    with pytest.raises(ValueError, match="relaxation"):
        AdaptivePDHG(relaxation=0.0)
    c, A, b, Ae, be = random_lp(0)
    with pytest.raises(ConvergenceError, match="AdaptivePDHG"):
        linprog(T(c), T(A), T(b), bounds=(0, 2), solver=AdaptivePDHG(max_iter=1))
    one = torch.ones(2, dtype=torch.float64)
    res = linprog(one, T([[1.0, 1.0]]), T([-1.0]), solver=AdaptivePDHG(), throw=False)
    assert int(res.status) == Status.INFEASIBLE


def test_free_and_mixed_bounds():
    c, A, b, Ae, be = random_lp(3, 20, 30)
    bounds = [(0, None)] * 10 + [(None, 1)] * 10 + [(-1, 1)] * 10
    ref = scipy_linprog(c, A, b, Ae, be, bounds=bounds, method="highs")
    res = linprog(T(c), T(A), T(b), T(Ae), T(be), bounds=bounds, throw=False)
    if ref.status == 3:
        assert int(res.status) == Status.UNBOUNDED
        return
    assert res.success
    assert abs(float(res.fun) - ref.fun) / (1 + abs(ref.fun)) <= 1e-6


def assignment(n: int, seed: int):
    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (n, n))
    Aeq = np.zeros((2 * n, n * n))
    for i in range(n):
        Aeq[i, i * n:(i + 1) * n] = 1
        Aeq[n + i, i::n] = 1
    return C, Aeq


@pytest.mark.parametrize("solver", [PDHG(), AdaptivePDHG()], ids=["PDHG", "AdaptivePDHG"])
def test_assignment_problem(solver):
    n = 15
    C, Aeq = assignment(n, 5)
    r, k = linear_sum_assignment(C)
    res = linprog(T(C.ravel()), A_eq=T(Aeq), b_eq=T(np.ones(2 * n)), solver=solver)
    opt = C[r, k].sum()
    assert abs(float(res.fun) - opt) / (1 + opt) <= 1e-6
    assert float(res.aux.primal_residual) / (1 + np.sqrt(2 * n)) <= 1e-6
    X = res.x.numpy().reshape(n, n)
    assert np.allclose(X[r, k], 1, atol=1e-5)


def test_restarts_cut_iterations_at_least_2x():
    c, A, b, Ae, be = random_lp(0)
    args = (T(c), T(A), T(b), T(Ae), T(be))
    with_r = linprog(*args, bounds=(0, 2), solver=PDHG(polish=False))
    n_r = int(with_r.nit)
    no_r = linprog(*args, bounds=(0, 2), solver=PDHG(restart="none", polish=False, max_iter=2 * n_r), throw=False)
    assert not bool(no_r.converged) and int(no_r.status) == Status.MAX_ITER


def test_infeasible_and_unbounded_certificates():
    one = torch.ones(2, dtype=torch.float64)
    res = linprog(one, T([[1.0, 1.0]]), T([-1.0]), throw=False)
    assert int(res.status) == Status.INFEASIBLE and int(res.nit) < 1000
    res = linprog(T([-1.0, 0.0]), T([[1.0, -1.0]]), T([1.0]), throw=False)
    assert int(res.status) == Status.UNBOUNDED and int(res.nit) < 1000
    rng = np.random.default_rng(1)
    A = rng.standard_normal((10, 20))
    res = linprog(T(rng.standard_normal(20)), A_eq=T(A), b_eq=T(A @ np.full(20, 3.0)), bounds=(0, 1), throw=False)
    assert int(res.status) == Status.INFEASIBLE
    with pytest.raises(ConvergenceError, match="INFEASIBLE"):
        linprog(one, T([[1.0, 1.0]]), T([-1.0]))


def test_failure_semantics():
    c, A, b, Ae, be = random_lp(0)
    with pytest.raises(ConvergenceError, match="max_iter=1"):
        linprog(T(c), T(A), T(b), bounds=(0, 2), solver=PDHG(max_iter=1))
    cn = T(c).clone()
    cn[0] = float("nan")
    res = linprog(cn, T(A), T(b), bounds=(0, 2), throw=False)
    assert int(res.status) == Status.NONFINITE
    with pytest.raises(ValueError, match="restart"):
        PDHG(restart="sometimes")


def test_batch_matches_loop_and_sparse_matches_dense():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((10, 20))
    b = A @ np.full(20, 0.5) + 0.1
    cs = rng.standard_normal((3, 20))
    res = linprog(T(cs), T(A), T(b), bounds=(0, 1))
    assert res.x.shape == (3, 20) and res.fun.shape == (3,)
    for i in range(3):
        ref = scipy_linprog(cs[i], A, b, bounds=(0, 1), method="highs")
        assert abs(float(res.fun[i]) - ref.fun) <= 1e-6 * (1 + abs(ref.fun))
    res_s = linprog(T(cs), sp.csr_matrix(A), T(b), bounds=(0, 1))
    assert torch.allclose(res_s.fun, res.fun, atol=1e-7)
    res_t = linprog(T(cs), T(A).to_sparse(), T(b), bounds=(0, 1))
    assert torch.allclose(res_t.fun, res.fun, atol=1e-7)


def test_warm_start_saves_iterations():
    c, A, b, Ae, be = random_lp(1)
    args = (T(c), T(A), T(b), T(Ae), T(be))
    cold = linprog(*args, bounds=(0, 2), solver=PDHG(polish=False))
    y0 = torch.cat([cold.aux.eqlin, -cold.aux.ineqlin])
    warm = linprog(*args, bounds=(0, 2), x0=cold.x, y0=y0, solver=PDHG(polish=False))
    assert int(warm.nit) < int(cold.nit) // 2


def test_lp_gradients_match_duals_and_finite_differences():
    rng = np.random.default_rng(3)
    A = T(rng.standard_normal((8, 12)))
    b = A @ torch.full((12,), 0.5, dtype=torch.float64) + 0.2
    c = T(rng.standard_normal(12)).requires_grad_()
    bb = b.clone().requires_grad_()
    res = linprog(c, A, bb, bounds=(0, 1))
    gc, gb = torch.autograd.grad(res.fun, (c, bb))
    ref = scipy_linprog(c.detach().numpy(), A.numpy(), b.numpy(), bounds=(0, 1), method="highs")
    assert np.allclose(gc.numpy(), ref.x, atol=1e-6)
    assert np.allclose(gb.numpy(), ref.ineqlin.marginals, atol=1e-6)
    # dx/db through the active set (exact for a nondegenerate vertex), against central differences
    w = T(rng.standard_normal(12))
    res = linprog(c, A, bb, bounds=(0, 1))
    (g,) = torch.autograd.grad((res.x * w).sum(), bb)
    eps = 1e-3  # the LP is piecewise linear: central differences are exact while the basis holds
    for i in range(3):
        d = torch.zeros(8, dtype=torch.float64)
        d[i] = eps
        up = linprog(c.detach(), A, b + d, bounds=(0, 1)).x
        dn = linprog(c.detach(), A, b - d, bounds=(0, 1)).x
        assert abs(float(((up - dn) * w).sum() / (2 * eps)) - float(g[i])) <= 1e-4
    # and dx/dc = 0 for the LP
    res = linprog(c, A, bb, bounds=(0, 1))
    (gx,) = torch.autograd.grad((res.x * w).sum(), c)
    assert gx.abs().max() <= 1e-8


def test_regularized_gradient_gamma():
    rng = np.random.default_rng(4)
    A = T(rng.standard_normal((5, 6)))
    b = A @ torch.full((6,), 0.5, dtype=torch.float64) + 0.3
    c = T(0.2 * rng.standard_normal(6)).requires_grad_()
    grad = LPGradient(gamma=0.5)
    res = linprog(c, A, b, bounds=(0, 1), gradient=grad)
    w = T(rng.standard_normal(6))
    (g,) = torch.autograd.grad((res.x * w).sum(), c)
    eps = 1e-5
    fd = []
    for i in range(6):
        d = torch.zeros(6, dtype=torch.float64)
        d[i] = eps
        up = linprog(c.detach() + d, A, b, bounds=(0, 1), gradient=grad).x
        dn = linprog(c.detach() - d, A, b, bounds=(0, 1), gradient=grad).x
        fd.append(float(((up - dn) * w).sum() / (2 * eps)))
    assert np.allclose(g.numpy(), fd, atol=1e-4)
    assert g.abs().max() > 1e-3  # the regularized solution moves with c


def test_diag_qp_matches_cvxpy():
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(2)
    n, m = 15, 6
    q = rng.uniform(0.5, 2, n)
    c = rng.standard_normal(n)
    A = rng.standard_normal((m, n))
    b = A @ np.full(n, 0.2) + 0.1
    Ae = rng.standard_normal((2, n))
    be = Ae @ np.full(n, 0.2)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(q, x ** 2)) + c @ x),
                      [A @ x <= b, Ae @ x == be, x >= -1, x <= 1])
    prob.solve()
    res = diag_qp(T(q), T(c), T(A), T(b), T(Ae), T(be), bounds=(-1, 1))
    assert np.allclose(res.x.numpy(), x.value, atol=1e-5)
    assert abs(float(res.fun) - prob.value) <= 1e-6 * (1 + abs(prob.value))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    c, A, b, Ae, be = random_lp(0)
    cpu = linprog(T(c), T(A), T(b), T(Ae), T(be), bounds=(0, 2))
    dev = linprog(T(c).cuda(), T(A).cuda(), T(b).cuda(), T(Ae).cuda(), T(be).cuda(), bounds=(0, 2))
    assert abs(float(dev.fun.cpu()) - float(cpu.fun)) <= 1e-6 * (1 + abs(float(cpu.fun)))

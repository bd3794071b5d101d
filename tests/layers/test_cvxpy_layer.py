"""CvxpyLayer: drop-in agreement with cvxpylayers (outputs 1e-5, gradients 1e-4, float64), the QP
path never calls cvxpylayers/diffcp/Problem.solve, solver_args mapping, delegation and errors."""

from __future__ import annotations

import builtins
import sys

import numpy as np
import pytest
import torch

from optlayers._result import ConvergenceError
from optlayers.layers.qp import CvxpyLayer

cp = pytest.importorskip("cvxpy")
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _problems():
    """(name, problem, parameters, variables, values) from the cvxpylayers docs and tests."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    out = []
    # least squares (README)
    m, n = 8, 4
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    out.append(("least_squares", cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b))), [A, b], [x],
                [torch.randn(5, m, n, dtype=F64, generator=g), torch.randn(5, m, dtype=F64, generator=g)]))
    # constrained least squares (README: x >= 0), plus a budget equality
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    out.append(("constrained_least_squares",
                cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0, cp.sum(x) == 1]), [A, b], [x],
                [torch.randn(5, m, n, dtype=F64, generator=g), torch.randn(5, m, dtype=F64, generator=g)]))
    # Euclidean projection onto the probability simplex
    k = 6
    y, x = cp.Parameter(k), cp.Variable(k)
    out.append(("simplex_projection", cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0, cp.sum(x) == 1]),
                [y], [x], [torch.randn(7, k, dtype=F64, generator=g)]))
    # shared (A) and batched (b) parameters mixed, box constraints, and a constraint dual variable
    m, n = 6, 3
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    cons = [x >= -1, x <= 1]
    out.append(("mixed_shared_batched",
                cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)), cons),
                [A, b], [x, cons[0].dual_variables[0]],
                [torch.randn(m, n, dtype=F64, generator=g), torch.randn(4, m, dtype=F64, generator=g)]))
    # logistic regression (exponential cone: the delegate path)
    N, d = 12, 2
    X, lam, w = cp.Parameter((N, d)), cp.Parameter(nonneg=True), cp.Variable(d)
    yv = (rng.random(N) > 0.5).astype(float)
    loss = cp.sum(cp.logistic(X @ w)) / N - yv @ (X @ w) / N + lam * cp.sum_squares(w)
    out.append(("logistic_regression", cp.Problem(cp.Minimize(loss)), [X, lam], [w],
                [torch.randn(N, d, dtype=F64, generator=g), torch.tensor(0.1, dtype=F64)]))
    return out


@pytest.mark.parametrize("case", _problems(), ids=lambda c: c[0])
def test_drop_in_matches_cvxpylayers(case):
    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    name, prob, params, variables, values = case
    ours = CvxpyLayer(prob, parameters=params, variables=variables)
    ref = cvxpylayers.CvxpyLayer(prob, parameters=params, variables=variables)
    assert ours.backend == ("cvxpylayers" if name == "logistic_regression" else "optlayers")
    v1 = [v.clone().requires_grad_() for v in values]
    v2 = [v.clone().requires_grad_() for v in values]
    o1 = ours(*v1, solver_args={"eps": 1e-10})
    o2 = ref(*v2, solver_args={"eps": 1e-10})
    assert len(o1) == len(o2)
    for a, b in zip(o1, o2, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(a.shape, dtype=F64, generator=g) for a in o1]
    g1 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(o1, ws, strict=True)), v1)
    g2 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(o2, ws, strict=True)), v2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=1e-4)


def test_qp_path_never_calls_cvxpylayers_diffcp_or_solve(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("called on the QP path")

    monkeypatch.setattr(cp.Problem, "solve", boom)
    try:
        import diffcp
        monkeypatch.setattr(diffcp, "solve_and_derivative_batch", boom)
        monkeypatch.setattr(diffcp, "solve_and_derivative", boom)
    except ImportError:
        pass
    real_import = builtins.__import__

    def guarded(name, *a, **k):
        if name.startswith(("cvxpylayers", "diffcp")):
            raise AssertionError(f"import of {name} on the QP path")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", guarded)
    for mod in [m for m in sys.modules if m.startswith(("cvxpylayers", "diffcp"))]:
        monkeypatch.delitem(sys.modules, mod)
    for name, prob, params, variables, values in _problems()[:4]:
        layer = CvxpyLayer(prob, parameters=params, variables=variables)
        outs = layer(*[v.clone().requires_grad_() for v in values])
        sum(o.sum() for o in outs).backward()
        assert layer.backend == "optlayers", name


def test_results_match_cvxpy_and_batch_shapes():
    n = 4
    P = cp.Parameter((n, n), PSD=True)  # a parametric quadratic form (not DPP for cvxpylayers' conic path)
    q, x = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x), [x >= -1, x <= 1])
    layer = CvxpyLayer(prob, parameters=[P, q], variables=[x])
    g = torch.Generator().manual_seed(2)
    L = torch.randn(3, n, n, dtype=F64, generator=g)
    Pv = L @ L.mT + 0.1 * torch.eye(n, dtype=F64)
    qv = 3 * torch.randn(3, n, dtype=F64, generator=g)
    (xb,) = layer(Pv, qv)
    assert xb.shape == (3, n)
    for i in range(3):
        P.value, q.value = Pv[i].numpy(), qv[i].numpy()
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(xb[i].numpy(), x.value, atol=1e-6)
    (x0,) = layer(Pv[0], qv[0])  # unbatched in, unbatched out
    assert x0.shape == (n,)
    torch.testing.assert_close(x0, xb[0], atol=1e-9, rtol=0)
    res = layer.solve(Pv, qv)
    assert res.status.shape == (3,) and bool(res.converged.all())


def test_solver_args_mapping_and_validation():
    y, x = cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    layer = CvxpyLayer(prob, parameters=[y], variables=[x], solver_args={"max_iters": 60})
    yt = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    (x1,) = layer(yt, solver_args={"eps": 1e-9})
    torch.testing.assert_close(x1, yt.clamp_min(0), atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match=r"unknown solver_args \['acceleration_lookback'\].*valid keys.*eps"):
        layer(yt, solver_args={"acceleration_lookback": 0})
    with pytest.raises(ValueError, match="unknown solver_args"):
        CvxpyLayer(prob, parameters=[y], variables=[x], solver_args={"bogus": 1})
    with pytest.raises(ConvergenceError, match="MAX_ITER"):
        layer(yt, solver_args={"max_iters": 1})


def test_infeasible_parameters_name_the_batch_index():
    b, x = cp.Parameter(), cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.square(x)), [x >= b, x <= 1])
    layer = CvxpyLayer(prob, parameters=[b], variables=[x])
    with pytest.raises(ConvergenceError, match=r"INFEASIBLE.*failing batch indices \[1\]"):
        layer(torch.tensor([0.5, 2.0, -1.0], dtype=F64))
    soft = CvxpyLayer(prob, parameters=[b], variables=[x], throw=False)
    res = soft.solve(torch.tensor([0.5, 2.0, -1.0], dtype=F64))
    assert res.converged.tolist() == [True, False, True]
    torch.testing.assert_close(res.solution[0][[0, 2]], torch.tensor([0.5, 0.0], dtype=F64), atol=1e-8, rtol=0)


def test_constructor_errors_and_missing_delegate(monkeypatch):
    y, x = cp.Parameter(2), cp.Variable(2)
    with pytest.raises(ValueError, match="DPP"):
        CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x) * y[0] * y[1])), parameters=[y], variables=[x])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)))
    with pytest.raises(ValueError, match="exactly match"):
        CvxpyLayer(prob, parameters=[], variables=[x])
    socp = cp.Problem(cp.Minimize(cp.norm(x - y, 2)))
    real_import = builtins.__import__

    def no_cvxpylayers(name, *a, **k):
        if name.startswith("cvxpylayers"):
            raise ImportError("No module named 'cvxpylayers'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cvxpylayers)
    for mod in [m for m in sys.modules if m.startswith("cvxpylayers")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(ImportError, match=r"pip install 'optlayers\[cvxpy\]'"):
        CvxpyLayer(socp, parameters=[y], variables=[x])

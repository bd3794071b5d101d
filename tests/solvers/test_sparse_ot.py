"""Sparsity-constrained and quadratically regularized OT: oracles, limits, gradients, failures."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from scipy.optimize import linear_sum_assignment

from optlayers import ConvergenceError, Status
from optlayers.solvers.projections import project_simplex, project_sparse_simplex
from optlayers.solvers.sparse_ot import (
    DualAdam,
    DualLBFGS,
    SparseTransportPlan,
    quadratic_ot,
    sparse_ot,
    sparse_simplex_projection,
    sparsemax,
)

ot = pytest.importorskip("ot")

F64 = torch.float64


def _problem(n: int, m: int, seed: int = 0, uniform: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 2, generator=g, dtype=F64), torch.rand(m, 2, generator=g, dtype=F64)
    C = torch.cdist(x, y) ** 2
    if uniform:
        return torch.full((n,), 1 / n, dtype=F64), torch.full((m,), 1 / m, dtype=F64), C
    a = torch.rand(n, generator=g, dtype=F64) + 0.5
    b = torch.rand(m, generator=g, dtype=F64) + 0.5
    return a / a.sum(), b / b.sum(), C


def _small() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 x 4 problem where k = 2 row sparsity binds yet the marginals are met (a smooth point)."""
    g = torch.Generator().manual_seed(9)
    C = torch.rand(5, 4, generator=g, dtype=F64)
    ta, tb = torch.rand(5, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64)
    return (ta + 1) / (ta + 1).sum(), (tb + 1) / (tb + 1).sum(), C


def _pot_l2(a: torch.Tensor, b: torch.Tensor, C: torch.Tensor, gamma: float) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        return ot.smooth.smooth_ot_dual(a.numpy(), b.numpy(), C.numpy(), gamma, reg_type="l2", stopThr=1e-15,
                                        numItermax=20_000)


# ---------------------------------------------------------------------------------------------
# quadratically regularized OT (k -> infinity)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
def test_quadratic_matches_pot(formulation: str) -> None:
    a, b, C = _problem(12, 9)
    gamma = 0.05
    res = quadratic_ot(a, b, C, gamma=gamma, formulation=formulation)
    assert bool(res.converged) and int(res.status) == Status.SUCCESS
    P = res.aux.plan.to_dense()
    G = torch.from_numpy(_pot_l2(a, b, C, gamma))
    pot_obj = float((C * G).sum() + 0.5 * gamma * (G * G).sum())
    # optimality certificate: a plan feasible to 1e-9 whose value equals a dual value (weak duality)
    assert float(res.aux.marginal_violation) <= 1e-8
    torch.testing.assert_close(res.aux.value, res.aux.primal_value, rtol=1e-8, atol=1e-12)
    # POT's L-BFGS-B stops on function-value noise, so it only agrees to about 1e-6
    torch.testing.assert_close(P, G, rtol=0, atol=1e-5)
    assert abs(float(res.aux.primal_value) - pot_obj) < 1e-6
    torch.testing.assert_close(res.aux.transport_cost, (C * P).sum(), rtol=1e-12, atol=0)


def test_dual_and_semi_dual_agree() -> None:
    a, b, C = _problem(15, 11, seed=1)
    r1 = quadratic_ot(a, b, C, gamma=0.1, formulation="semi_dual")
    r2 = quadratic_ot(a, b, C, gamma=0.1, formulation="dual")
    torch.testing.assert_close(r1.aux.value, r2.aux.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r1.aux.plan.to_dense(), r2.aux.plan.to_dense(), rtol=0, atol=1e-7)
    # potentials agree up to the shift invariance (f + c, g - c)
    (f1, g1), (f2, g2) = r1.solution, r2.solution
    c = (f2 - f1).mean()
    torch.testing.assert_close(f2 - c, f1, rtol=0, atol=1e-6)
    torch.testing.assert_close(g2 + c, g1, rtol=0, atol=1e-6)
    # and where k binds but the marginals can be met, too
    a, b, C = _small()
    s1 = sparse_ot(a, b, C, k=2, gamma=0.5, sparsity="row")
    s2 = sparse_ot(a, b, C, k=2, gamma=0.5, sparsity="row", formulation="dual")
    assert float(s1.aux.marginal_violation) < 1e-8 and float(s2.aux.marginal_violation) < 1e-8
    assert int((s1.aux.plan.to_dense() > 0).sum(1).max()) == 2  # binding
    torch.testing.assert_close(s1.aux.plan.to_dense(), s2.aux.plan.to_dense(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
def test_large_k_equals_quadratic(formulation: str) -> None:
    a, b, C = _problem(14, 10, seed=2)
    q = quadratic_ot(a, b, C, gamma=0.1, formulation=formulation)
    support = int(q.aux.max_nnz)
    assert support < 14
    for k in (support, support + 3, 14, 1000):  # k = n is fine (POT crashes there); k is clipped
        r = sparse_ot(a, b, C, k=k, gamma=0.1, formulation=formulation)
        assert int(r.aux.k) == min(k, 14)
        torch.testing.assert_close(r.aux.value, q.aux.value, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r.aux.primal_value, q.aux.primal_value, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(r.aux.plan.to_dense(), q.aux.plan.to_dense(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the sparsity constraint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
@pytest.mark.parametrize("sparsity", ["column", "row"])
def test_at_most_k_nonzeros(formulation: str, sparsity: str) -> None:
    a, b, C = _problem(13, 9, seed=3)
    for k in (1, 2, 3):
        r = sparse_ot(a, b, C, k=k, gamma=0.05, sparsity=sparsity, formulation=formulation, throw=False)
        assert not bool(torch.isnan(r.residual))
        P = r.aux.plan.to_dense()
        nnz = (P > 0).sum(0 if sparsity == "column" else 1)
        assert int(nnz.max()) <= k and int(r.aux.max_nnz) <= k
        assert bool((P >= 0).all())
        # the reported violation is the plan's (never hidden)
        viol = (P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum()
        torch.testing.assert_close(r.aux.marginal_violation, viol, rtol=1e-9, atol=1e-12)
        if formulation == "semi_dual":  # the constrained side's marginal is exact
            side = P.sum(0) if sparsity == "column" else P.sum(1)
            torch.testing.assert_close(side, b if sparsity == "column" else a, rtol=0, atol=1e-12)


def test_violation_reported_as_a_function_of_k() -> None:
    a, b, C = _problem(20, 12, seed=4)
    viol = [float(sparse_ot(a, b, C, k=k, gamma=0.02, throw=False).aux.marginal_violation) for k in (1, 2, 4, 20)]
    assert viol[0] > 0.1  # 12 one-sparse columns cannot cover 20 rows
    assert viol[-1] < 1e-8
    assert viol[0] >= viol[1] >= viol[2] - 1e-6


def test_binding_k_dual_below_semi_dual_and_pot() -> None:
    """Where k binds: max D <= max S (the dual is the looser relaxation); both reach at least the
    dual value of POT's sparsity-constrained solvers (same problem, reg = γ, max_nz = k)."""
    a, b, C = _problem(16, 10, seed=15)
    gamma, k = 0.02, 2
    s = sparse_ot(a, b, C, k=k, gamma=gamma, throw=False)
    d = sparse_ot(a, b, C, k=k, gamma=gamma, formulation="dual", throw=False)
    assert int(s.aux.max_nnz) == k and float(s.aux.marginal_violation) > 1e-3  # k binds: a gap is left
    # up to the stall tolerance of DualLBFGS (ftol = 1e-8 relative to max(|f|, max|C| Σa))
    slack = 1e-8 * max(abs(float(s.aux.value)), float(C.abs().max()))
    assert float(d.aux.value) <= float(s.aux.value) + slack
    with contextlib.redirect_stdout(io.StringIO()):  # POT's sparse projection prints
        for fn, ours in ((ot.smooth.smooth_ot_semi_dual, s), (ot.smooth.smooth_ot_dual, d)):
            _, log = fn(a.numpy(), b.numpy(), C.numpy(), gamma, reg_type="sparsity_constrained", max_nz=k,
                        stopThr=1e-12, numItermax=5000, log=True)
            pot_value = -float(log["res"].fun)
            assert float(ours.aux.value) >= pot_value - 1e-6 * abs(pot_value)


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
def test_k1_small_gamma_recovers_assignment(formulation: str) -> None:
    rng = np.random.default_rng(0)
    n = 8
    for _ in range(3):
        C = rng.random((n, n))
        rows, cols = linear_sum_assignment(C)
        r = sparse_ot(None, None, torch.from_numpy(C), k=1, gamma=1e-3, formulation=formulation)
        P = r.aux.plan.to_dense().numpy()
        expected = np.zeros((n, n))
        expected[rows, cols] = 1 / n
        np.testing.assert_allclose(P, expected, atol=1e-9)
        assert abs(float(r.aux.transport_cost) - C[rows, cols].sum() / n) < 1e-9


def test_objective_approaches_emd() -> None:
    a, b, C = _problem(10, 10, seed=5, uniform=True)
    emd = float(ot.emd2(a.numpy(), b.numpy(), C.numpy()))
    gaps = []
    for gamma in (1e-1, 1e-2, 1e-3):
        r = sparse_ot(a, b, C, k=1, gamma=gamma, formulation="dual")
        gaps.append(float(r.aux.value) - emd)
        assert abs(float(r.aux.transport_cost) - emd) < 1e-9
        q = quadratic_ot(a, b, C, gamma=gamma)
        assert -1e-12 <= float(q.aux.primal_value) - emd <= 0.5 * gamma * float((a * a).sum()) + 1e-12
    assert abs(gaps[-1]) < 1e-4 and abs(gaps[0]) >= abs(gaps[1]) >= abs(gaps[2])


def test_row_sparsity_is_the_transposed_problem() -> None:
    a, b, C = _problem(9, 12, seed=6)
    r = sparse_ot(a, b, C, k=2, gamma=0.05, sparsity="row", throw=False)
    t = sparse_ot(b, a, C.T, k=2, gamma=0.05, sparsity="column", throw=False)
    torch.testing.assert_close(r.aux.plan.to_dense(), t.aux.plan.to_dense().T)
    torch.testing.assert_close(r.aux.value, t.aux.value)
    torch.testing.assert_close(r.solution[0], t.solution[1])


def test_batched_equals_loop_and_float32() -> None:
    g = torch.Generator().manual_seed(7)
    C = torch.rand(3, 2, 8, 6, generator=g, dtype=F64)
    gamma = torch.tensor([[0.05, 0.1], [0.2, 0.05], [0.1, 0.1]], dtype=F64)
    r = sparse_ot(None, None, C, k=2, gamma=gamma, throw=False)
    assert r.aux.plan.shape == (3, 2, 8, 6) and r.residual.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            s = sparse_ot(None, None, C[i, j], k=2, gamma=float(gamma[i, j]), throw=False)
            torch.testing.assert_close(r.aux.value[i, j], s.aux.value, rtol=1e-6, atol=1e-9)
    q = quadratic_ot(None, None, C[0, 0].float(), gamma=0.1)
    assert q.aux.value.dtype == torch.float32 and bool(q.converged)
    torch.testing.assert_close(q.aux.value.double(), quadratic_ot(None, None, C[0, 0], gamma=0.1).aux.value,
                               rtol=1e-4, atol=1e-6)


def test_adam_fixed_iterations() -> None:
    a, b, C = _problem(10, 8, seed=8)
    ref = quadratic_ot(a, b, C, gamma=0.1)
    r = quadratic_ot(a, b, C, gamma=0.1, solver=DualAdam(lr=0.02, max_iter=400), throw=False)
    assert int(r.iterations) == 400
    assert float(r.residual) < 5e-2
    assert abs(float(r.aux.value) - float(ref.aux.value)) < 1e-3 * abs(float(ref.aux.value)) + 1e-4
    with pytest.raises(ConvergenceError, match="MAX_ITER"):
        quadratic_ot(a, b, C, gamma=0.1, solver="adam")


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
@pytest.mark.parametrize("k,sparsity", [(None, "column"), (2, "row")])
def test_gradcheck_cost_and_weights(formulation: str, k: int | None, sparsity: str) -> None:
    a, b, C = _small()
    C = C.clone().requires_grad_(True)
    ta, tb = (a * 5).requires_grad_(True), (b * 4).requires_grad_(True)

    def outputs(C, ta, tb):
        r = sparse_ot(ta / ta.sum(), tb / tb.sum(), C, k=k, gamma=0.5, sparsity=sparsity,
                      formulation=formulation, tol=1e-12)
        return r.aux.plan.to_dense(), r.aux.value, r.aux.transport_cost, r.solution[0]

    assert float(sparse_ot(a, b, C, k=k, gamma=0.5, sparsity=sparsity).aux.marginal_violation) < 1e-9
    assert torch.autograd.gradcheck(outputs, (C, ta, tb), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    if formulation == "semi_dual" and k is None:  # one full (slow-mode) check
        assert torch.autograd.gradcheck(lambda C: outputs(C, ta, tb)[0], (C,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradient_matches_finite_differences_and_envelope() -> None:
    a, b, C = _problem(8, 7, seed=10)
    C = C.clone().requires_grad_(True)
    r = quadratic_ot(a, b, C, gamma=0.1)
    gC, = torch.autograd.grad(r.aux.primal_value, C)
    gV, = torch.autograd.grad(r.aux.value, C)
    P = r.aux.plan.to_dense().detach()
    torch.testing.assert_close(gC, P, rtol=0, atol=1e-8)  # primal value: implicit gradient = P
    torch.testing.assert_close(gV, P, rtol=0, atol=1e-12)  # dual value: envelope gradient = P
    # transport cost, against central differences
    E = torch.randn(8, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    gT, = torch.autograd.grad(quadratic_ot(a, b, C, gamma=0.1).aux.transport_cost, C)
    h = 1e-6
    with torch.no_grad():
        fp = quadratic_ot(a, b, C + h * E, gamma=0.1, tol=1e-13).aux.transport_cost
        fm = quadratic_ot(a, b, C - h * E, gamma=0.1, tol=1e-13).aux.transport_cost
    torch.testing.assert_close((gT * E).sum(), (fp - fm) / (2 * h), rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# failures and arguments
# ---------------------------------------------------------------------------------------------


def test_failures_are_loud() -> None:
    a, b, C = _problem(10, 8, seed=11)
    with pytest.raises(ConvergenceError) as err:
        quadratic_ot(a, b, C, gamma=0.01, solver=DualLBFGS(max_iter=1))
    msg = str(err.value)
    assert "sparse_ot" in msg and "MAX_ITER" in msg and "max_iter=1" in msg
    r = quadratic_ot(a, b, C, gamma=0.01, solver=DualLBFGS(max_iter=1), throw=False)
    assert not bool(r.converged) and int(r.status) == Status.MAX_ITER
    Cn = C.clone()
    Cn[0, 0] = float("nan")
    r = sparse_ot(a, b, Cn, k=2, gamma=0.1, throw=False)
    assert int(r.status) == Status.NONFINITE
    with pytest.raises(ConvergenceError, match="NONFINITE"):
        sparse_ot(a, b, Cn, k=2, gamma=0.1)


def test_argument_checks() -> None:
    a, b, C = _problem(5, 4)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        sparse_ot(a, b, C, k=0, gamma=0.1)
    with pytest.raises(ValueError, match="'column', 'row'"):
        sparse_ot(a, b, C, k=1, gamma=0.1, sparsity="columns")
    with pytest.raises(ValueError, match="'semi_dual', 'dual'"):
        sparse_ot(a, b, C, k=1, gamma=0.1, formulation="primal")
    with pytest.raises(ValueError, match="sum\\(a\\) == sum\\(b\\)"):
        sparse_ot(a, 2 * b, C, k=1, gamma=0.1)
    with pytest.raises(ValueError, match="gamma must be positive"):
        sparse_ot(a, b, C, k=1, gamma=0.0)
    with pytest.raises(ValueError, match="nonnegative"):
        sparse_ot(-a, -b, C, k=1, gamma=0.1)
    with pytest.raises(ValueError, match="valid: DualLBFGS"):
        sparse_ot(a, b, C, k=1, gamma=0.1, solver="bfgs")
    with pytest.raises(ValueError, match="memory"):
        DualLBFGS(memory=0)
    with pytest.raises(ValueError, match="lr"):
        DualAdam(lr=-1.0)


# ---------------------------------------------------------------------------------------------
# plan object and projections
# ---------------------------------------------------------------------------------------------


def test_sparse_plan_operator() -> None:
    a, b, C = _problem(9, 7, seed=12)
    for sparsity in ("column", "row"):
        P = sparse_ot(a, b, C, k=3, gamma=0.05, sparsity=sparsity, throw=False).aux.plan
        D = P.to_dense()
        v, u = torch.randn(7, 2, dtype=F64), torch.randn(9, dtype=F64)
        torch.testing.assert_close(P.matvec(v), D @ v)
        torch.testing.assert_close(P @ v[:, 0], D @ v[:, 0])
        torch.testing.assert_close(P.rmatvec(u), D.T @ u)
        torch.testing.assert_close(P.T.to_dense(), D.T)
        r1, c1 = P.marginals()
        torch.testing.assert_close(r1, D.sum(1))
        torch.testing.assert_close(c1, D.sum(0))
        torch.testing.assert_close(P.transport_cost(), (C * D).sum())
        vals, idx = P.topk(2)
        torch.testing.assert_close(vals, torch.topk(D, 2, dim=-1).values)
        leaves, spec = pytree.tree_flatten(P)
        Q = pytree.tree_unflatten(leaves, spec)
        assert isinstance(Q, SparseTransportPlan) and torch.equal(Q.to_dense(), D)
        with pytest.raises(ValueError, match="expected a tensor of shape"):
            P.matvec(torch.ones(5, dtype=F64))


def test_sparsemax_and_projection_match_reference() -> None:
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 6, 10, generator=g, dtype=F64, requires_grad=True)
    torch.testing.assert_close(sparsemax(x, dim=1), project_simplex(x, dim=1))
    torch.testing.assert_close(sparsemax(x, k=3), project_sparse_simplex(x, 3))
    s = torch.rand(4, 6, generator=g, dtype=F64) + 0.1
    v, i = sparse_simplex_projection(x, 2, s)
    torch.testing.assert_close(torch.zeros_like(x).scatter(-1, i, v), project_sparse_simplex(x, 2, s))
    w = torch.randn(4, 6, 10, generator=g, dtype=F64)
    g1, = torch.autograd.grad((sparsemax(x, k=3) * w).sum(), x)
    g2, = torch.autograd.grad((project_sparse_simplex(x, 3) * w).sum(), x)
    torch.testing.assert_close(g1, g2)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, k=4), (x[0].detach().requires_grad_(),))


def test_torch_func_vmap_and_grad() -> None:
    C = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(14), dtype=F64)

    def f(c: torch.Tensor) -> torch.Tensor:
        return sparse_ot(None, None, c, k=3, gamma=0.2).aux.transport_cost

    torch.testing.assert_close(torch.func.vmap(f)(C), torch.stack([f(c) for c in C]))
    c0 = C[0].clone().requires_grad_(True)
    expected, = torch.autograd.grad(f(c0), c0)
    torch.testing.assert_close(torch.func.grad(f)(C[0]), expected)


# ---------------------------------------------------------------------------------------------
# the compiled whole-solve L-BFGS kernel against the PyTorch loop (its specification)
# ---------------------------------------------------------------------------------------------


def _torch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    mod = importlib.import_module("optlayers.solvers.sparse_ot.sparse_ot")
    monkeypatch.setattr(mod, "_fused_lbfgs", lambda *args: None)


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
@pytest.mark.parametrize("k", [None, 2])
def test_fused_lbfgs_matches_torch_loop(formulation: str, k: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    from optlayers.kernels import Backend, call_count
    from optlayers.kernels.sparse_ot_dual import LBFGS_KERNEL_NAME

    g = torch.Generator().manual_seed(3)
    C = torch.rand(2, 70, 60, generator=g, dtype=F64)  # 4,200 entries: the Numba kernels are chosen
    a = torch.rand(2, 70, generator=g, dtype=F64) + 0.5
    b = torch.rand(2, 60, generator=g, dtype=F64) + 0.5
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    before = call_count(LBFGS_KERNEL_NAME, Backend.NUMBA)
    fused = sparse_ot(a, b, C, k=k, gamma=0.05, formulation=formulation)
    assert call_count(LBFGS_KERNEL_NAME, Backend.NUMBA) == before + (1 if formulation == "semi_dual" else 2)
    _torch_loop(monkeypatch)
    ref = sparse_ot(a, b, C, k=k, gamma=0.05, formulation=formulation)
    assert call_count(LBFGS_KERNEL_NAME, Backend.NUMBA) == before + (1 if formulation == "semi_dual" else 2)
    # the same iteration: the same number of steps (up to round-off in the last digits of the
    # tail, where the violation approaches 1e-9) and the same plan
    assert torch.equal(fused.status, ref.status) and bool(fused.converged.all())
    if k is None:
        assert bool(((fused.iterations - ref.iterations).abs() <= 0.05 * ref.iterations + 2).all())
        assert torch.allclose(fused.aux.plan.to_dense(), ref.aux.plan.to_dense(), atol=1e-9)
        assert torch.allclose(fused.aux.value, ref.aux.value, rtol=1e-10)
        assert bool((fused.aux.marginal_violation <= 1e-9).all())
    else:
        # a binding k makes the dual nonsmooth: round-off (summation order) lets the two
        # trajectories part near ties, both ending where the dual stalls
        assert bool(((fused.iterations - ref.iterations).abs() <= 0.25 * ref.iterations).all())
        assert torch.allclose(fused.aux.value, ref.aux.value, rtol=1e-5)
        assert bool((fused.aux.max_nnz <= k).all())
        assert torch.allclose(fused.aux.marginal_violation, ref.aux.marginal_violation, rtol=0.2)


def test_fused_lbfgs_statuses_and_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    from optlayers.kernels import Backend, call_count
    from optlayers.kernels.sparse_ot_dual import LBFGS_KERNEL_NAME

    a, b, C = _problem(80, 60, seed=5)
    count = call_count(LBFGS_KERNEL_NAME, Backend.NUMBA)
    r = quadratic_ot(a, b, C, gamma=0.01, solver=DualLBFGS(max_iter=3), throw=False)
    assert int(r.status) == Status.MAX_ITER and int(r.iterations) == 3 and not bool(r.converged)
    with pytest.raises(ConvergenceError, match="MAX_ITER"):
        quadratic_ot(a, b, C, gamma=0.01, solver=DualLBFGS(max_iter=3))
    assert call_count(LBFGS_KERNEL_NAME, Backend.NUMBA) == count + 2
    # float32: computed in float64 by the kernel, returned in float32, meets the float32 tolerance
    r32 = quadratic_ot(a.float(), b.float(), C.float(), gamma=0.05)
    r64 = quadratic_ot(a, b, C, gamma=0.05)
    assert r32.solution[0].dtype == torch.float32 and bool(r32.converged)
    assert torch.allclose(r32.aux.plan.to_dense().double(), r64.aux.plan.to_dense(), atol=1e-5)
    # a callback, a forced reference backend or non-finite data take the PyTorch loop
    seen: list[int] = []
    quadratic_ot(a, b, C, gamma=0.05, callback=lambda i, res: seen.append(i))
    quadratic_ot(a, b, C, gamma=0.05, backend="reference")
    Cn = C.clone()
    Cn[3, 4] = float("nan")
    assert int(sparse_ot(a, b, Cn, k=2, gamma=0.1, throw=False).status) == Status.NONFINITE
    assert seen and call_count(LBFGS_KERNEL_NAME, Backend.NUMBA) == count + 4  # the two solves above

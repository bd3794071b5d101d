"""Batched interior-point QP solver: accuracy against CVXPY, broadcasting, PSD/LP cases,
infeasibility and unboundedness per element, failure semantics, float32, warm start, KKT helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optlayers._result import ConvergenceError, Status
from optlayers.solvers.qp import InteriorPoint, QuadraticSmoothing, factor_kkt, kkt_matvec, solve_kkt, solve_qp
from optlayers.solvers.qp.kkt import static_delta

cp = pytest.importorskip("cvxpy")

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def random_qp(B: int, n: int, m: int, p: int, *, dtype: torch.dtype = F64, seed: int = 0, psd: bool = False):
    """Feasible by construction (inequalities with slack at x0, equalities through x0)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, dtype=dtype, generator=g)
    Q = L @ L.transpose(-1, -2) / n + (0.0 if psd else 0.1) * torch.eye(n, dtype=dtype)
    q = torch.randn(B, n, dtype=dtype, generator=g)
    G = torch.randn(B, m, n, dtype=dtype, generator=g)
    x0 = torch.randn(B, n, dtype=dtype, generator=g)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, dtype=dtype, generator=g)
    A = torch.randn(B, p, n, dtype=dtype, generator=g)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    return Q, q, G, h, A, b


def cvxpy_qp(Q, q, G, h, A, b):
    """Reference solution with Clarabel at tight tolerances."""
    Q, q, G, h, A, b = (np.asarray(t, dtype=np.float64) for t in (Q, q, G, h, A, b))
    x = cp.Variable(q.shape[0])
    cons = []
    if G.shape[0]:
        cons.append(G @ x <= h)
    if A.shape[0]:
        cons.append(A @ x == b)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q)) + q @ x), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10)
    assert prob.status == "optimal"
    return x.value, (cons[0].dual_value if G.shape[0] else None)


@pytest.mark.parametrize("B,n,m,p", [(6, 4, 3, 0), (5, 10, 8, 3), (3, 25, 30, 5), (2, 40, 20, 10)])
def test_random_qps_match_cvxpy(B, n, m, p):
    data = random_qp(B, n, m, p, seed=n)
    res = solve_qp(*data)
    assert res.solution.shape == (B, n)
    assert bool(res.converged.all()) and bool((res.status == Status.SUCCESS).all())
    for i in range(B):
        x_ref, lam_ref = cvxpy_qp(*(t[i] for t in data))
        np.testing.assert_allclose(res.solution[i].numpy(), x_ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(res.aux.ineq_dual[i].numpy(), lam_ref, atol=1e-6, rtol=0)
    # slack and complementarity
    Q, q, G, h, A, b = data
    slack = h - (G @ res.solution.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(res.aux.slack, slack, atol=1e-8, rtol=0)
    assert float((res.aux.slack * res.aux.ineq_dual).abs().max()) < 1e-8


def test_shared_and_batched_data_broadcast():
    Q, q, G, h, A, b = random_qp(4, 6, 5, 2, seed=3)
    # Q, G, A shared; p, h, b batched — and a 2-d batch shape for p
    res = solve_qp(Q[0], q, G[0], h[0] + 1.0, A[0], b[0])
    loop = torch.stack([solve_qp(Q[0], q[i], G[0], h[0] + 1.0, A[0], b[0]).solution for i in range(4)])
    torch.testing.assert_close(res.solution, loop, atol=1e-9, rtol=0)
    res2 = solve_qp(Q[0], q.reshape(2, 2, 6), G[0], h[0] + 1.0)
    assert res2.solution.shape == (2, 2, 6) and res2.status.shape == (2, 2)
    # unbatched everything -> 0-d flags
    r0 = solve_qp(Q[0], q[0], G[0], h[0], A[0], b[0])
    assert r0.solution.shape == (6,) and r0.converged.shape == ()


def test_psd_q_and_lp_with_unique_solution():
    # LP: max x1 + 2 x2 on the simplex slice x1 - x2 = 0.2 -> vertex (0.6, 0.4)
    Z = torch.zeros(2, 2, dtype=F64)
    c = -torch.tensor([1.0, 2.0], dtype=F64)
    G = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]], dtype=F64)
    h = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    A = torch.tensor([[1.0, -1.0]], dtype=F64)
    b = torch.tensor([0.2], dtype=F64)
    res = solve_qp(Z, c, G, h, A, b)
    torch.testing.assert_close(res.solution, torch.tensor([0.6, 0.4], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(res.aux.ineq_dual, torch.tensor([0.0, 0.0, 1.5], dtype=F64), atol=1e-9, rtol=0)
    # PSD (rank-deficient) Q with constraints making the solution unique, batch of random LPs with boxes
    Q, q, G, h, A, b = random_qp(4, 8, 6, 2, seed=5, psd=True)
    Q = Q[:, :, :4] @ Q[:, :4, :]  # rank <= 4
    Gb = torch.cat([G, torch.eye(8, dtype=F64).expand(4, 8, 8), -torch.eye(8, dtype=F64).expand(4, 8, 8)], 1)
    hb = torch.cat([h + 1, torch.full((4, 16), 5.0, dtype=F64)], 1)
    res = solve_qp(Q, q, Gb, hb, A, b)
    for i in range(4):
        x_ref, _ = cvxpy_qp(Q[i], q[i], Gb[i], hb[i], A[i], b[i])
        np.testing.assert_allclose(res.solution[i].numpy(), x_ref, atol=1e-6, rtol=0)


def test_rank_deficient_equalities():
    Q, q, G, h, A, b = random_qp(2, 6, 4, 2, seed=7)
    A3 = torch.cat([A, A[:, :1] * 2.0], 1)  # a duplicated (consistent) equality
    b3 = torch.cat([b, b[:, :1] * 2.0], 1)
    res = solve_qp(Q, q, G, h, A3, b3)
    ref = solve_qp(Q, q, G, h, A, b)
    torch.testing.assert_close(res.solution, ref.solution, atol=1e-8, rtol=0)


def _infeasible_batch():
    Q, q, G, h, A, b = random_qp(4, 3, 2, 0, seed=11)
    box = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=F64).expand(4, 2, 3)
    G = torch.cat([G, box], 1)
    h = torch.cat([h, torch.full((4, 2), 5.0, dtype=F64)], 1)
    h[2, -2:] = -1.0  # element 2: x1 <= -1 and x1 >= 1
    return Q, q, G, h


def test_infeasible_element_reported_alone():
    Q, q, G, h = _infeasible_batch()
    res = solve_qp(Q, q, G, h, throw=False)
    assert res.status.tolist() == [0, 0, int(Status.INFEASIBLE), 0]
    assert res.converged.tolist() == [True, True, False, True]
    assert torch.isnan(res.solution[2]).all() and torch.isfinite(res.solution[[0, 1, 3]]).all()
    ok = solve_qp(Q[[0, 1, 3]], q[[0, 1, 3]], G[[0, 1, 3]], h[[0, 1, 3]])
    torch.testing.assert_close(res.solution[[0, 1, 3]], ok.solution, atol=1e-10, rtol=0)
    with pytest.raises(ConvergenceError, match=r"INFEASIBLE.*failing batch indices \[2\]"):
        solve_qp(Q, q, G, h)


def test_unbounded_element_reported_alone():
    c = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [1.0, 2.0]], dtype=F64)
    G = -torch.eye(2, dtype=F64)  # x >= 0
    h = torch.zeros(2, dtype=F64)
    res = solve_qp(torch.zeros(2, 2, dtype=F64), c, G, h, throw=False)
    assert res.status.tolist() == [0, int(Status.UNBOUNDED), 0]
    assert torch.isnan(res.solution[1]).all()
    with pytest.raises(ConvergenceError, match=r"UNBOUNDED.*failing batch indices \[1\]"):
        solve_qp(torch.zeros(2, 2, dtype=F64), c, G, h)
    # unbounded QP: PSD Q with a descent direction in its null space and no constraints
    Q = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    r = solve_qp(Q, torch.tensor([0.0, 1.0], dtype=F64), throw=False)
    assert int(r.status) == Status.UNBOUNDED


def test_nonfinite_input_and_max_iter():
    data = list(random_qp(3, 4, 3, 1, seed=2))
    data[1] = data[1].clone()
    data[1][1, 0] = float("nan")
    res = solve_qp(*data, throw=False)
    assert res.status.tolist() == [0, int(Status.NONFINITE), 0]
    with pytest.raises(ConvergenceError, match=r"MAX_ITER.*max_iter=1"):
        solve_qp(*random_qp(2, 4, 3, 1), solver=InteriorPoint(max_iter=1))


def test_float32_close_to_float64():
    data = random_qp(8, 12, 10, 2, seed=4)
    r64 = solve_qp(*data)
    r32 = solve_qp(*(t.float() for t in data))
    assert r32.solution.dtype == torch.float32 and bool(r32.converged.all())
    err = (r32.solution.double() - r64.solution).abs().max() / r64.solution.abs().max()
    assert float(err) < 1e-3


def test_warm_start_and_no_sync_mode():
    data = random_qp(4, 10, 8, 2, seed=8)
    cold = solve_qp(*data)
    warm = solve_qp(*data, init=cold)
    torch.testing.assert_close(warm.solution, cold.solution, atol=1e-9, rtol=0)
    assert int(warm.iterations.max()) <= int(cold.iterations.max())
    fixed = solve_qp(*data, solver=InteriorPoint(check_every=None, max_iter=40))
    torch.testing.assert_close(fixed.solution, cold.solution, atol=1e-9, rtol=0)
    assert bool(fixed.converged.all())


@pytest.mark.parametrize("check_every", [1, 3])
def test_batch_compaction_matches_uncompacted_solves(check_every):
    """Elements leave the working set as they finish (different iteration counts, an infeasible
    element, shared and batched data, down to one element): every output row must equal the
    solve of that element alone, and the callback must see full-batch residuals."""
    Q, q, G, h = _infeasible_batch()  # element 2 infeasible
    Qb, qb, Gb, hb, _, _ = random_qp(4, 3, 4, 0, seed=5)
    q = q.clone()
    q[3] = 40.0 * q[3]  # a badly scaled element needs more iterations than the others
    Gs = torch.cat([G, Gb], 1)[0]  # shared G (no batch dimension) with batched h
    hs = torch.cat([h, hb + 10.0], 1)
    seen = []
    cfg = InteriorPoint(check_every=check_every, callback=lambda it, r: seen.append(r.shape))
    for data in ((Q, q, G, h), (Q[0], q, Gs, hs)):
        res = solve_qp(*data, solver=cfg, throw=False)
        assert len(set(res.iterations.tolist())) > 1  # elements finished at different iterations
        assert set(seen) == {torch.Size([4])}
        for i in range(4):
            one = solve_qp(*(t[i] if t.dim() > (2 if t is data[0] or t is data[2] else 1) else t for t in data),
                           solver=InteriorPoint(check_every=None, max_iter=int(res.iterations[i]) + 1), throw=False)
            assert int(one.status) == int(res.status[i])
            if int(res.status[i]) == 0:
                torch.testing.assert_close(res.solution[i], one.solution, atol=1e-9, rtol=0)
                torch.testing.assert_close(res.aux.ineq_dual[i], one.aux.ineq_dual, atol=1e-8, rtol=0)
        assert res.status.tolist() == [0, 0, int(Status.INFEASIBLE), 0]


def test_config_validation():
    with pytest.raises(ValueError, match="max_iter"):
        InteriorPoint(max_iter=0)
    with pytest.raises(ValueError, match="step_fraction"):
        InteriorPoint(step_fraction=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        QuadraticSmoothing(0.0)
    with pytest.raises(ValueError, match="broadcast"):
        solve_qp(torch.eye(2, dtype=F64).expand(3, 2, 2), torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="G and h"):
        solve_qp(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), G=torch.eye(2, dtype=F64))


def test_kkt_solve_matches_dense():
    Q, q, G, h, A, b = random_qp(3, 5, 4, 2, seed=9)
    w = torch.rand(3, 4, dtype=F64) + 1e-3
    f = factor_kkt(Q, A, G, w, static_delta(Q, A, G, 3, 1e-8))
    rx, ry, rz = torch.randn(3, 5, dtype=F64), torch.randn(3, 2, dtype=F64), torch.randn(3, 4, dtype=F64)
    x, y, z = solve_kkt(f, rx, ry, rz, refine=2)
    kx, ky, kz = kkt_matvec(Q, A, G, w, x, y, z)
    torch.testing.assert_close(torch.cat([kx, ky, kz], -1), torch.cat([rx, ry, rz], -1), atol=1e-9, rtol=0)


def test_unconstrained_and_equality_only_closed_form():
    g = torch.Generator().manual_seed(12)
    L = torch.randn(4, 4, dtype=F64, generator=g)
    Q = L @ L.T + torch.eye(4, dtype=F64)
    p = torch.randn(3, 4, dtype=F64, generator=g)
    res = solve_qp(Q, p)
    torch.testing.assert_close(res.solution, torch.linalg.solve(Q, -p.T).T, atol=1e-10, rtol=0)
    A, b = torch.randn(2, 4, dtype=F64, generator=g), torch.randn(2, dtype=F64, generator=g)
    K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(2, 2, dtype=F64)], 1)])
    sol = torch.linalg.solve(K, torch.cat([-p, b.expand(3, 2)], 1).T).T
    res = solve_qp(Q, p, A=A, b=b)
    torch.testing.assert_close(res.solution, sol[:, :4], atol=1e-10, rtol=0)
    torch.testing.assert_close(res.aux.eq_dual, sol[:, 4:], atol=1e-10, rtol=0)
    assert res.aux.ineq_dual.shape == (3, 0) and res.aux.slack.shape == (3, 0)


@pytest.mark.parametrize("kind", ["ineq_only", "eq_only"])
def test_warm_start_without_one_kind_of_constraint(kind):
    """Warm starts work when the QP has no equalities (or no inequalities): empty duals."""
    Q = torch.eye(2, dtype=torch.float64)
    p = -torch.ones(2, dtype=torch.float64)
    if kind == "ineq_only":
        data = dict(G=torch.eye(2, dtype=torch.float64), h=torch.full((2,), 0.5, dtype=torch.float64))
    else:
        data = dict(A=torch.ones(1, 2, dtype=torch.float64), b=torch.ones(1, dtype=torch.float64))
    cold = solve_qp(Q, p, **data)
    warm = solve_qp(Q, p, **data, init=cold)
    torch.testing.assert_close(warm.solution, cold.solution, atol=1e-7, rtol=0)
    torch.testing.assert_close(warm.solution, torch.full((2,), 0.5, dtype=torch.float64), atol=1e-7, rtol=0)
    assert int(warm.iterations) <= int(cold.iterations)


# ---- the inequality Schur-complement form of the KKT solves (kkt_form="schur") ----------------
def test_schur_solve_matches_dense_kkt():
    from optlayers.solvers.qp.kkt import factor_schur, schur_constant, solve_schur, solve_schur_ineq

    g = torch.Generator().manual_seed(3)
    for k in (0, 2):
        B, n, m = 3, 5, 7
        L = torch.randn(B, n, n, dtype=F64, generator=g)
        Q = L @ L.mT + 0.1 * torch.eye(n, dtype=F64)
        A = torch.randn(B, k, n, dtype=F64, generator=g)
        G = torch.randn(1, m, n, dtype=F64, generator=g)  # shared G
        w = torch.rand(B, m, dtype=F64, generator=g) + 0.01
        sc = schur_constant(Q, A, G, 1e8)  # no regularization: the solve is exact
        f = factor_schur(sc, w)
        K = torch.zeros(B, n + k + m, n + k + m, dtype=F64)
        K[:, :n, :n], K[:, n:n + k, :n], K[:, :n, n:n + k] = Q, A, A.mT
        K[:, n + k:, :n], K[:, :n, n + k:], K[:, n + k:, n + k:] = G, G.mT, -torch.diag_embed(w)
        r = torch.randn(B, n + k + m, 2, dtype=F64, generator=g)
        x, yc = solve_schur(f, r[:, :n], r[:, n:])
        torch.testing.assert_close(torch.cat([x, yc], -2), torch.linalg.solve(K, r), atol=1e-10, rtol=0)
        r[:, : n + k] = 0.0
        x, yc = solve_schur_ineq(f, r[:, n + k:])
        torch.testing.assert_close(torch.cat([x, yc], -2), torch.linalg.solve(K, r), atol=1e-10, rtol=0)
    # W = s/λ is infinite at an inactive constraint of an exact solution (λ = 0): the factor stays
    # finite and that row's dz is 0, as for a very large W.
    w_inf = w.clone()
    w_inf[:, 0] = float("inf")
    K[:, n + k, n + k] = -1e30
    x, yc = solve_schur(factor_schur(sc, w_inf), r[:, :n], r[:, n:])
    assert bool(torch.isfinite(x).all() & torch.isfinite(yc).all())
    torch.testing.assert_close(torch.cat([x, yc], -2), torch.linalg.solve(K, r), atol=1e-10, rtol=0)


def test_schur_constant_declines_unsuitable_data():
    from optlayers.solvers.qp.kkt import schur_constant

    Q, _, G, _, A, _ = random_qp(3, 6, 4, 2, seed=1)
    assert schur_constant(Q, A, G, 1e8) is not None
    Qpsd = Q.clone()
    Qpsd[1] = Q[1, :, :2] @ Q[1, :2, :]  # rank 2: Q only PSD in element 1
    assert schur_constant(Qpsd, A, G, 1e8) is None
    A_dup = torch.cat([A, A[:, :1]], 1)  # rank-deficient equalities
    assert schur_constant(Q, A_dup, G, 1e8) is None
    assert schur_constant(Q, A, G, 1.0) is None  # condition number above the limit
    # ... unless that element is excluded from the check (non-finite data is handled elsewhere)
    assert schur_constant(Qpsd, A, G, 1e8, valid=torch.tensor([True, False, True])) is not None


@pytest.mark.parametrize("B,n,m,p", [(4, 12, 5, 3), (3, 8, 16, 0), (2, 30, 10, 6)])
def test_schur_form_matches_normal_form_and_cvxpy(B, n, m, p, monkeypatch):
    import optlayers.solvers.qp.interior_point as ip_mod

    data = random_qp(B, n, m, p, seed=11 + n)
    with monkeypatch.context() as mp:  # the Schur form must really run (no silent fallback)
        mp.setattr(ip_mod, "factor_kkt", lambda *a, **k: (_ for _ in ()).throw(AssertionError("normal form ran")))
        schur = solve_qp(*data, solver=InteriorPoint(kkt_form="schur"))
    normal = solve_qp(*data, solver=InteriorPoint(kkt_form="normal"))
    torch.testing.assert_close(schur.solution, normal.solution, atol=1e-8, rtol=0)
    torch.testing.assert_close(schur.aux.ineq_dual, normal.aux.ineq_dual, atol=1e-7, rtol=0)
    for i in range(B):
        x_ref, lam_ref = cvxpy_qp(*(t[i] for t in data))
        np.testing.assert_allclose(schur.solution[i].numpy(), x_ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(schur.aux.ineq_dual[i].numpy(), lam_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("check_every", [1, None])
def test_schur_form_infeasible_element_and_fallback(check_every):
    Q, q, G, h = _infeasible_batch()  # element 2 infeasible
    cfg = InteriorPoint(kkt_form="schur", check_every=check_every, max_iter=50)
    res = solve_qp(Q, q, G, h, solver=cfg, throw=False)
    ref = solve_qp(Q, q, G, h, solver=InteriorPoint(kkt_form="normal", check_every=check_every, max_iter=50),
                   throw=False)
    assert res.status.tolist() == ref.status.tolist() == [0, 0, int(Status.INFEASIBLE), 0]
    ok = res.status == 0
    torch.testing.assert_close(res.solution[ok], ref.solution[ok], atol=1e-9, rtol=0)
    # An LP (Q = 0) cannot use the Schur form: kkt_form="schur" falls back to the normal form.
    Z = torch.zeros(2, 2, dtype=F64)
    c = -torch.tensor([1.0, 2.0], dtype=F64)
    Gl = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]], dtype=F64)
    hl = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    lp = solve_qp(Z, c, Gl, hl, solver=cfg)
    torch.testing.assert_close(lp.solution, torch.tensor([0.0, 1.0], dtype=F64), atol=1e-9, rtol=0)


def test_kkt_form_validation():
    with pytest.raises(ValueError, match="kkt_form"):
        InteriorPoint(kkt_form="dense")
    with pytest.raises(ValueError, match="schur_max_cond"):
        InteriorPoint(schur_max_cond=-1.0)

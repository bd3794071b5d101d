"""The QP layer's closed-form reverse-mode gradient (``optlayers.solvers.qp.explicit_vjp``).

A plain reverse-mode call of :func:`optlayers.layers.qp` differentiates through
``QPExplicitGrad`` (one KKT solve, OptNet's formulas); ``torch.func`` transforms and forward mode
take the generic :func:`~optlayers.implicit.custom_root` route. Both must give the same gradient,
for every input, shared or batched, from the solution and from the duals.
"""

from __future__ import annotations

import pytest
import torch
from test_qp_layer import random_qp  # same folder (pytest's default prepend import mode)

import optlayers.solvers.qp.explicit_vjp as explicit_mod
from optlayers._result import AdjointSolveError
from optlayers.layers.qp import qp
from optlayers.layers.qp.qp_layer import _qp_generic
from optlayers.solvers.qp import InteriorPoint
from optlayers.solvers.qp._data import prepare_qp

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(res, weights):
    wx, wn, wl, ws = weights
    return ((res.solution * wx).sum() + (res.aux.eq_dual * wn).sum() + (res.aux.ineq_dual * wl).sum()
            + (res.aux.slack * ws).sum())


def _weights(res, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, dtype=t.dtype, generator=g)
            for t in (res.solution, res.aux.eq_dual, res.aux.ineq_dual, res.aux.slack)]


def _generic_grads(data, weights):
    ins = [t.detach().clone().requires_grad_() for t in data]
    d = prepare_qp(*ins)
    res = _qp_generic(InteriorPoint(), d, tuple(ins), (None, None, None), True)
    return torch.autograd.grad(_loss(res, weights), ins)


# Batch shapes of (Q, p, G, h, A, b), cut from a (2, 3) batch; () means shared (no batch dimension).
LAYOUTS = {
    "all_batched": [(3,)] * 6,
    "shared_Q_G_A": [(), (3,), (), (3,), (), (3,)],
    "two_batch_dims": [(2, 3), (2, 3), (1, 3), (2, 3), (3,), (2, 3)],
    "shared_all_but_p": [(), (2, 3), (), (), (), ()],
}
CUT = {(): (0, 0), (3,): (0,), (2, 3): (), (1, 3): (slice(0, 1),)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_explicit_matches_generic_route(layout):
    full = random_qp((2, 3), 5, 4, 2, seed=3)
    data = [t[CUT[s]] for t, s in zip(full, LAYOUTS[layout])]
    ins = [t.clone().requires_grad_() for t in data]
    res = qp(*ins)
    assert res.solution.grad_fn is not None and "QPExplicitGrad" in type(res.solution.grad_fn).__name__
    weights = _weights(res)
    grads = torch.autograd.grad(_loss(res, weights), ins)
    ref = _generic_grads(data, weights)
    for name, g, r, t in zip("Q p G h A b".split(), grads, ref, data):
        assert g.shape == t.shape, name
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


def test_gradcheck_explicit_path():
    data = random_qp((2,), 4, 3, 1, seed=5)
    data[0] = data[0][0]  # shared Q

    def f(Q, p, G, h, A, b):
        Qs = 0.5 * (Q + Q.mT)
        r = qp(Qs, p, G, h, A, b)
        return r.solution, r.aux.eq_dual, r.aux.ineq_dual

    ins = [t.clone().requires_grad_() for t in data]
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_only_some_inputs_require_grad_and_partial_cotangents():
    data = random_qp((3,), 5, 4, 2, seed=7)
    ins = [t.clone() for t in data]
    ins[2].requires_grad_()  # G only
    res = qp(*ins)
    (gG,) = torch.autograd.grad(res.aux.ineq_dual.sum(), [ins[2]])  # a cotangent on λ only
    full = [t.clone().requires_grad_() for t in data]
    ref = _generic_grads(full, [torch.zeros_like(res.solution), torch.zeros_like(res.aux.eq_dual),
                                torch.ones_like(res.aux.ineq_dual), torch.zeros_like(res.aux.slack)])[2]
    torch.testing.assert_close(gG, ref, rtol=1e-8, atol=1e-10)
    ins = [t.clone() for t in data]
    ins[4].requires_grad_()  # A only, without G
    (gA,) = torch.autograd.grad(qp(*ins).solution.sum(), [ins[4]])
    assert torch.isfinite(gA).all() and gA.abs().max() > 0


def test_double_backward_replays_generic_route():
    data = random_qp((2,), 4, 3, 1, seed=9)
    p = data[1].clone().requires_grad_()
    x = qp(data[0], p, *data[2:]).solution
    (g,) = torch.autograd.grad((x ** 2).sum(), p, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.sum(), p)
    # Reference: the same second derivative through torch.func (the generic primitive throughout).
    f = lambda pp: (qp(data[0], pp, *data[2:]).solution ** 2).sum()  # noqa: E731
    ref = torch.func.grad(lambda pp: torch.func.grad(f)(pp).sum())(data[1])
    torch.testing.assert_close(gg, ref, rtol=1e-7, atol=1e-9)


def test_no_grad_call_builds_no_graph_and_skips_factor():
    data = random_qp((2,), 4, 3, 1)
    with torch.no_grad():
        res = qp(*[t.clone().requires_grad_() for t in data])
    assert res.solution.grad_fn is None
    res = qp(*data)  # nothing requires grad
    assert res.solution.grad_fn is None


def test_singular_adjoint_raises(monkeypatch):
    data = random_qp((2,), 4, 3, 1)
    ins = [t.clone().requires_grad_() for t in data]
    x = qp(*ins).solution

    class Never:
        rtol = 1e-10

        def __call__(self, op, b, x0=None):
            from optlayers.implicit.linear_solvers import Dense
            res = Dense("lu")(op, b)
            return res.replace(converged=torch.zeros_like(res.converged))

    orig = explicit_mod._closed_form_grads

    def patched(state, *a):
        import dataclasses
        return orig(dataclasses.replace(state, solver=Never()), *a)

    monkeypatch.setattr(explicit_mod, "_closed_form_grads", patched)
    monkeypatch.setattr(explicit_mod, "_compiled_adjoint", lambda *a: None)
    with pytest.raises(AdjointSolveError, match="adjoint solve of qp"):
        x.sum().backward()


def test_forward_mode_and_vmap_take_generic_route():
    data = random_qp((2,), 4, 3, 1, seed=11)
    tang = torch.randn_like(data[1])
    _, jv = torch.func.jvp(lambda pp: qp(data[0], pp, *data[2:]).solution, (data[1],), (tang,))
    J = torch.func.jacrev(lambda pp: qp(data[0], pp, *data[2:]).solution)(data[1])  # (2, n, 2, n)
    torch.testing.assert_close(jv, torch.einsum("bixj,xj->bi", J, tang), rtol=1e-8, atol=1e-10)
    with torch.autograd.forward_ad.dual_level():
        import torch.autograd.forward_ad as fwAD
        pd = fwAD.make_dual(data[1], tang)
        out = fwAD.unpack_dual(qp(data[0], pd, *data[2:]).solution).tangent
    torch.testing.assert_close(out, jv, rtol=1e-8, atol=1e-10)


@pytest.mark.kernels
def test_compiled_adjoint_matches_batched_kktsolve(monkeypatch):
    pytest.importorskip("numba")
    data = random_qp((6,), 7, 9, 2, seed=13)
    calls = []
    orig = explicit_mod._compiled_adjoint

    def spy(state, *a):
        out = orig(state, *a)
        calls.append((state.solver.cache.entries[0].compiled, out is not None))
        return out

    monkeypatch.setattr(explicit_mod, "_compiled_adjoint", spy)
    ins = [t.clone().requires_grad_() for t in data]
    res = qp(*ins)
    weights = _weights(res)
    grads = torch.autograd.grad(_loss(res, weights), ins)
    if not calls[0][0]:
        pytest.skip("the compiled interior point did not run (OPTLAYERS_KERNELS=reference)")
    assert calls[0][1], "the compiled adjoint solve did not converge"
    monkeypatch.setattr(explicit_mod, "_compiled_adjoint", lambda *a: None)  # the batched KKTSolve
    ins2 = [t.clone().requires_grad_() for t in data]
    ref = torch.autograd.grad(_loss(qp(*ins2), weights), ins2)
    for name, g, r in zip("Q p G h A b".split(), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


@pytest.mark.kernels
def test_compiled_adjoint_falls_back_when_refinement_misses():
    pytest.importorskip("numba")
    from optlayers.kernels.qp_kkt_numba import kkt_refine_numba
    from optlayers.layers.qp.qp_layer import _solve_flat
    from optlayers.solvers.qp.adjoint import KKTCache

    data = random_qp((3,), 5, 4, 2, seed=17)
    d = prepare_qp(*data)
    cache = KKTCache()
    raw, _ = _solve_flat(InteriorPoint(backend="numba"), d, (None, None, None), True, cache)
    f = cache.entries[0].cholesky()
    x, lam = raw.solution, raw.aux.ineq_dual
    lam_c = torch.where(lam > 0, lam, torch.ones_like(lam))
    r = ((x.unsqueeze(-2) @ d.G.mT).squeeze(-2) - d.h) / lam_c
    g = torch.randn(3, 5 + 2 + 4, dtype=F64)
    u, ok, rel = kkt_refine_numba(f.L, f.C, f.d, d.Q, lam / lam_c, r, g, 2, 1e-10, 3)
    assert ok.all() and (rel <= 1e-10).all()
    K = torch.zeros(3, 11, 11, dtype=F64)  # the dense (∂_z F)ᵀ
    K[:, :5, :5] = d.Q.mT
    K[:, :5, 5:] = f.C.mT * torch.cat([torch.ones(3, 2, dtype=F64), lam / lam_c], -1).unsqueeze(-2)
    K[:, 5:, :5] = f.C
    K[:, 7:, 7:] = torch.diag_embed(r)
    torch.testing.assert_close(u, torch.linalg.solve(K, g), rtol=1e-8, atol=1e-10)
    _, ok0, rel0 = kkt_refine_numba(f.L, f.C, f.d, d.Q, lam / lam_c, r, g, 2, 1e-30, 0)  # unreachable tolerance
    assert not ok0.any() and (rel0 > 0).all()

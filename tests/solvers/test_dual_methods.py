"""Dual methods on Lagrangian duals of knapsack problems (vs the HiGHS LP-relaxation bound), and the
batch dual-ascent helper for group-relative policy optimization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog as highs

from optlayers._result import ConvergenceError
from optlayers.solvers.dual import (
    CuttingPlane,
    GroupDualAscent,
    ProximalBundle,
    SubgradientAscent,
    constrained_group_advantages,
    group_normalize,
    maximize_dual,
)


def knapsack(seed: int, n: int, m: int):
    """max pᵀx s.t. Wx ≤ C, x ∈ {0,1}ⁿ, relaxed: q(λ) = λᵀC + Σ (p_i − w_iᵀλ)₊ (as a min-form dual)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(1, 10, n)
    W = rng.uniform(1, 10, (m, n))
    C = W.sum(1) * 0.3
    lp = highs(-p, A_ub=W, b_ub=C, bounds=(0, 1), method="highs")
    pt, Wt, Ct = (torch.tensor(a) for a in (p, W, C))
    inner = lambda lam: (pt - Wt.T @ lam > 0).to(torch.float64)  # noqa: E731
    return inner, (lambda x: -(pt @ x)), (lambda x: Wt @ x - Ct), lp.fun, m


@pytest.mark.parametrize("seed,n,m", [(0, 30, 1), (1, 40, 3), (2, 50, 5)])
def test_bundle_matches_lp_relaxation_bound_and_beats_subgradient(seed, n, m):
    inner, f, g, qstar, m = knapsack(seed, n, m)
    lam0 = torch.zeros(m, dtype=torch.float64)
    res = maximize_dual(inner, f, g, lam0, method=ProximalBundle())
    assert res.success
    assert abs(float(res.aux.value) - qstar) <= 1e-6 * max(1.0, abs(qstar))
    calls = int(res.aux.oracle_calls)
    sub = maximize_dual(inner, f, g, lam0, method=SubgradientAscent(lr=0.1, max_iter=calls), throw=False)
    assert int(sub.aux.oracle_calls) == calls
    assert float(res.aux.value) > float(sub.aux.value) + 1e-6
    # the bundle's primal combination is (nearly) feasible for the LP relaxation
    assert float(res.aux.primal_violation.max()) <= 1e-4 * float(torch.tensor(1.0 + abs(qstar)))


def test_cutting_plane_and_polyak_subgradient():
    inner, f, g, qstar, m = knapsack(1, 40, 3)
    lam0 = torch.zeros(m, dtype=torch.float64)
    kel = maximize_dual(inner, f, g, lam0, method=CuttingPlane(box=100.0))
    assert kel.success and abs(float(kel.aux.value) - qstar) <= 1e-6 * abs(qstar)
    assert float(kel.aux.upper_bound) >= qstar - 1e-9
    pol = maximize_dual(inner, f, g, lam0, method=SubgradientAscent("polyak", target=qstar, max_iter=300),
                        throw=False)
    assert abs(float(pol.aux.value) - qstar) <= 1e-2 * abs(qstar)
    assert pol.aux.history.shape == (300,) and bool((pol.aux.history.diff() >= 0).all())
    dim = maximize_dual(inner, f, g, lam0, method=SubgradientAscent(lr=0.05, max_iter=300), throw=False)
    # ergodic primal average: violation shrinks toward feasibility
    assert float(dim.aux.primal_violation.max()) < float(g(inner(lam0)).max())


def test_failure_semantics_and_validation():
    inner, f, g, qstar, m = knapsack(0, 20, 2)
    with pytest.raises(ConvergenceError, match="ProximalBundle"):
        maximize_dual(inner, f, g, torch.zeros(m, dtype=torch.float64), method=ProximalBundle(max_iter=2))
    with pytest.raises(ValueError, match="target"):
        SubgradientAscent("polyak")
    with pytest.raises(ValueError, match="method"):
        maximize_dual(inner, f, g, torch.zeros(m, dtype=torch.float64), method="bundle")


def test_equality_multipliers_are_free():
    # min ½‖x‖² s.t. Σx = 1 (equality): x = −μ1, q(μ) = −n μ²/2 − μ, max at μ* = −1/n < 0, q* = 1/(2n)
    n = 4
    inner = lambda mu: -mu.expand(n).clone()  # noqa: E731
    res = maximize_dual(inner, lambda x: 0.5 * (x ** 2).sum(), lambda x: (x.sum() - 1).reshape(1),
                        torch.zeros(1, dtype=torch.float64), method=ProximalBundle(), eq=torch.tensor([True]))
    assert float(res.solution) == pytest.approx(-1 / n, abs=1e-6)
    assert float(res.aux.value) == pytest.approx(1 / (2 * n), abs=1e-9)


def test_group_dual_ascent_and_normalization():
    torch.manual_seed(0)
    R = torch.randn(4, 8, dtype=torch.float64)
    c = torch.randint(0, 2, (2, 4, 8)).to(torch.float64)
    A = group_normalize(R)
    assert torch.allclose(A.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    dual = GroupDualAscent(torch.tensor([0.9, 0.2]), lr=0.5)
    lam = dual.update(c)
    rates = c.reshape(2, -1).mean(-1)
    assert torch.allclose(lam, (0.5 * (torch.tensor([0.9, 0.2]) - rates)).clamp_min(0).to(lam.dtype))
    adv = dual.advantages(R, c)
    ref = group_normalize(R) + (lam[:, None, None] * group_normalize(c)).sum(0)
    assert torch.allclose(adv, ref)
    assert torch.allclose(constrained_group_advantages(R, c, lam), ref)
    # per-component normalization: scaling one component's raw scale does not change the advantage
    assert torch.allclose(constrained_group_advantages(R, 10 * c, lam), ref, atol=1e-5)
    assert "multiplier" in dual.state_dict()

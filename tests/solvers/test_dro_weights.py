"""robust_weights: limits, feasibility, Danskin gradients, batching, failure semantics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optlayers import ConvergenceError, Status
from optlayers.solvers.dro import (
    ChiSquareBall,
    ChiSquarePenalty,
    CressieRead,
    CVaR,
    HolisticRobust,
    KLBall,
    KLPenalty,
    Spectral,
    TotalVariation,
    dual_value,
    esrm,
    extremile,
    robust_weights,
    superquantile,
)


def _l(n: int = 9, seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, generator=g, dtype=torch.float64)


def value(losses: torch.Tensor, spec) -> torch.Tensor:
    return robust_weights(losses, spec).aux.value


# ---------------------------------------------------------------------------------------- limits


def test_limits_mean_and_max() -> None:
    l = _l(11)
    mean, mx = l.mean(), l.max()
    n = l.numel()
    assert torch.allclose(value(l, CVaR(1.0)), mean, atol=1e-15)
    assert torch.allclose(value(l, CVaR(1.0 / n)), mx, atol=1e-15)
    for small in (ChiSquareBall(0.0), KLBall(0.0), TotalVariation(0.0), CressieRead(3.0, rho=0.0),
                  HolisticRobust(0.0, 0.0), Spectral(extremile(1.0)), KLPenalty(1e6), ChiSquarePenalty(1e6)):
        assert torch.allclose(value(l, small), mean, atol=1e-5), small
    for big in (ChiSquareBall(float(n)), KLBall(math.log(n) + 1), TotalVariation(1.0), CressieRead(3.0, rho=1e3),
                KLPenalty(1e-7), ChiSquarePenalty(1e-6), HolisticRobust(1.0, 0.0)):
        assert torch.allclose(value(l, big), mx, atol=1e-5), big


def test_identities_between_specs() -> None:
    l = _l(40, 3)
    assert torch.allclose(value(l, Spectral(superquantile(0.75))), value(l, CVaR(0.25)), atol=1e-14)
    assert torch.allclose(value(l, CressieRead(2.0, rho=0.3)), value(l, ChiSquareBall(0.6)), atol=1e-14)
    assert torch.allclose(value(l, CressieRead(2.0, lam=0.4)), value(l, ChiSquarePenalty(0.2)), atol=1e-14)
    assert torch.allclose(value(l, HolisticRobust(0.2, 0.0)), value(l, TotalVariation(0.2)), atol=1e-14)
    assert torch.allclose(value(l, ChiSquareBall.from_fastdro(0.5)), value(l, ChiSquareBall(1.0)))
    assert CVaR.from_quantile_level(0.9).alpha == pytest.approx(0.1)
    # Cressie-Read approaches KL as k -> 1
    assert torch.allclose(value(l, CressieRead(1.0001, rho=0.2)), value(l, KLBall(0.2)), atol=1e-3)
    # Dr. DPO sign flip: -lam log mean exp(-l / lam), stable for huge losses
    big = torch.tensor([1e4, 2e4, 3e4], dtype=torch.float64)
    v = value(big, KLPenalty(0.5, optimistic=True))
    assert torch.isfinite(v) and abs(float(v) - (1e4 + 0.5 * math.log(3))) < 1e-8


def test_cvar_fractional_atom() -> None:
    l = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    res = robust_weights(l, CVaR(0.3))  # alpha n = 1.5: weights 2/3, 1/3
    assert torch.allclose(res.solution, torch.tensor([2 / 3, 1 / 3, 0, 0, 0], dtype=torch.float64))
    assert float(res.aux.value) == pytest.approx(5 * 2 / 3 + 4 / 3)
    assert float(res.aux.dual.eta) == 4.0


def test_ties_share_weight_and_permutation_equivariance() -> None:
    l = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0], dtype=torch.float64)
    for spec in (CVaR(0.4), TotalVariation(0.3), Spectral(esrm(3.0)), HolisticRobust(0.3, 0.2), ChiSquareBall(0.3)):
        p = robust_weights(l, spec).solution
        assert torch.allclose(p[0], p[2]) and torch.allclose(p[2], p[4]), spec
        perm = torch.tensor([4, 2, 0, 1, 3])
        assert torch.allclose(robust_weights(l[perm], spec).solution, p[perm], atol=1e-15), spec


# ----------------------------------------------------------------------------------- feasibility

SPECS = [CVaR(0.2), CVaR(0.3, smoothing=0.2), TotalVariation(0.25), ChiSquareBall(0.5), ChiSquareBall(0.5, lam=0.2),
         ChiSquarePenalty(0.3), KLBall(0.3), KLPenalty(0.3), CressieRead(3.0, rho=0.2), CressieRead(1.5, lam=0.5),
         Spectral(esrm(2.0)), Spectral(extremile(2.0), lam=0.1), Spectral(superquantile(0.5), lam=0.1, divergence="kl"),
         HolisticRobust(0.1, 0.2)]


def _inside(spec, res, n: int) -> bool:
    p = res.solution
    tol = 1e-9
    if isinstance(spec, CVaR):
        return bool(p.max() <= 1.0 / (spec.alpha * n) + tol)
    if isinstance(spec, TotalVariation):
        return bool(0.5 * (p - 1.0 / n).abs().sum() <= spec.eps + tol)
    if isinstance(spec, ChiSquareBall):
        return bool(((n * p - 1) ** 2).sum() / n <= spec.rho + tol)
    if isinstance(spec, KLBall):
        return bool(torch.special.xlogy(p, n * p).sum() <= spec.rho + tol)
    if isinstance(spec, CressieRead) and spec.rho is not None:
        k = spec.k
        return bool(((((n * p) ** k) - k * n * p + k - 1) / (k * (k - 1))).mean() <= spec.rho + tol)
    if isinstance(spec, HolisticRobust):  # KL(q || p) over the n + 1 atoms
        return bool(res.aux.divergence <= spec.r + tol)
    return True


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30), st.sampled_from(SPECS), st.floats(0.1, 10.0))
def test_weights_on_simplex_and_inside_set(vals: list[int], spec, scale: float) -> None:
    # integer grid values produce many ties
    l = torch.tensor(vals, dtype=torch.float64) * scale
    res = robust_weights(l, spec)
    p = res.solution
    n = l.numel()
    assert bool(res.converged)
    assert float(p.min()) >= 0.0 and abs(float(p.sum()) - 1.0) <= 1e-12
    assert _inside(spec, res, n)
    v = float(res.aux.value)
    assert float(l.mean()) - 1e-9 <= v <= float(l.max()) + 1e-9  # uniform weights are always feasible


# ----------------------------------------------------------------------------- Danskin gradients

DUAL_SPECS = [CVaR(0.23), ChiSquareBall(0.7), ChiSquareBall(0.3, lam=0.4), ChiSquarePenalty(0.3), KLBall(0.35),
              KLPenalty(0.6), CressieRead(3.0, rho=0.25), CressieRead(1.7, lam=0.5), HolisticRobust(0.1, 0.3)]


@pytest.mark.parametrize("spec", DUAL_SPECS, ids=lambda s: type(s).__name__)
def test_gradient_equals_finite_difference_of_dual(spec) -> None:
    l = _l(13, 5).requires_grad_(True)
    res = robust_weights(l, spec)
    res.aux.value.backward()
    grad = l.grad.clone()
    assert torch.allclose(grad, res.solution)
    h = 1e-6
    fd = torch.empty_like(grad)
    base = l.detach()
    for i in range(base.numel()):
        e = torch.zeros_like(base)
        e[i] = h
        vp = dual_value(base + e, spec, robust_weights(base + e, spec).aux.dual)
        vm = dual_value(base - e, spec, robust_weights(base - e, spec).aux.dual)
        fd[i] = (vp - vm) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-7), (grad - fd).abs().max()
    # dual value equals the primal value at the optimum
    assert torch.allclose(dual_value(base, spec, res.aux.dual), res.aux.value.detach(), atol=1e-10)


def test_gradcheck_value() -> None:
    l = _l(6, 2).requires_grad_(True)
    for spec in (KLPenalty(0.5), ChiSquarePenalty(0.4), KLBall(0.2), Spectral(esrm(1.0), lam=0.2, divergence="kl")):
        assert torch.autograd.gradcheck(lambda x: robust_weights(x, spec).aux.value, (l,), atol=1e-6)


# -------------------------------------------------------------------------- batching and dtypes


def test_batched_matches_loop_and_float32() -> None:
    l = _l(17, 7, batch=(2, 3))
    for spec in SPECS:
        res = robust_weights(l, spec)
        assert res.solution.shape == l.shape and res.aux.value.shape == (2, 3) and res.converged.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                r1 = robust_weights(l[i, j], spec)
                assert torch.allclose(res.solution[i, j], r1.solution, atol=1e-12), spec
        r32 = robust_weights(l.float(), spec)
        assert r32.solution.dtype == torch.float32
        assert torch.allclose(r32.aux.value.double(), res.aux.value, atol=1e-5), spec


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu() -> None:
    l = _l(300, 1, batch=(3,))
    for spec in SPECS:
        a = robust_weights(l, spec)
        b = robust_weights(l.cuda(), spec)
        assert b.solution.is_cuda
        assert torch.allclose(a.solution, b.solution.cpu(), atol=1e-10), spec


# ----------------------------------------------------------------------------- failure semantics


def test_nonfinite_rows_reported() -> None:
    l = _l(8, 1, batch=(3,))
    l[1, 2] = math.nan
    with pytest.raises(ConvergenceError, match="NONFINITE"):
        robust_weights(l, ChiSquareBall(0.5))
    res = robust_weights(l, KLBall(0.5), throw=False)
    assert res.converged.tolist() == [True, False, True]
    assert int(res.status[1]) == Status.NONFINITE
    assert bool(torch.isnan(res.solution[1]).all()) and bool(torch.isfinite(res.solution[0]).all())


def test_root_find_iteration_limit_raises() -> None:
    l = _l(50, 4)
    with pytest.raises(ConvergenceError, match="max_iter=1"):
        robust_weights(l, KLBall(0.3), max_iter=1)
    res = robust_weights(l, KLBall(0.3), max_iter=1, throw=False)
    assert not bool(res.converged) and int(res.status) == Status.MAX_ITER
    # still feasible
    p = res.solution
    assert float(torch.special.xlogy(p, 50 * p).sum()) <= 0.3 + 1e-12


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        CVaR(0.0)
    with pytest.raises(ValueError, match="exactly one"):
        CressieRead(2.0)
    with pytest.raises(ValueError, match="exactly one"):
        CressieRead(2.0, rho=1.0, lam=1.0)
    with pytest.raises(ValueError):
        KLBall(-1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        Spectral([0.6, 0.4])
    with pytest.raises(TypeError):
        robust_weights(torch.tensor([1, 2]), CVaR(0.5))
    with pytest.raises(TypeError, match="DRO spec"):
        robust_weights(torch.ones(3), "cvar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 losses"):
        robust_weights(torch.ones(3), Spectral([0.5, 0.5]))


def test_specs_are_frozen_and_hashable() -> None:
    s = CVaR(0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.alpha = 0.2  # type: ignore[misc]
    assert hash(s) == hash(CVaR(0.1)) and s == CVaR(0.1)

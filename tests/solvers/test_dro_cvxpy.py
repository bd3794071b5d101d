"""DRO inner problems against a CVXPY solve of the primal (values to 1e-6 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    esrm,
    extremile,
    robust_weights,
    superquantile,
)

cp = pytest.importorskip("cvxpy")

SIZES = [7, 50, 400]


def _losses(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1.0 + rng.exponential(size=n)  # positive: relative errors are meaningful


def _solve(objective, constraints) -> float:
    prob = cp.Problem(cp.Maximize(objective), constraints)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=400)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE), prob.status
    return float(prob.value)


def _ours(l: np.ndarray, spec) -> tuple[float, torch.Tensor]:
    res = robust_weights(torch.from_numpy(l), spec)
    p = res.solution
    assert abs(float(p.sum()) - 1.0) < 1e-12 and float(p.min()) >= 0.0
    return float(res.aux.value), p


def _close(ours: float, ref: float, rtol: float = 1e-6) -> None:
    assert abs(ours - ref) <= rtol * abs(ref), (ours, ref, abs(ours - ref) / abs(ref))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha", [0.1, 0.37])
def test_cvar(n: int, alpha: float) -> None:
    l = _losses(n, n)
    p = cp.Variable(n)
    ref = _solve(l @ p, [cp.sum(p) == 1, p >= 0, p <= 1.0 / (alpha * n)])
    ours, w = _ours(l, CVaR(alpha))
    _close(ours, ref)
    assert float(w.max()) <= 1.0 / (alpha * n) + 1e-12


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rho", [0.1, 2.0])
def test_chi_square_ball(n: int, rho: float) -> None:
    l = _losses(n, 10 + n)
    p = cp.Variable(n)
    ref = _solve(l @ p, [cp.sum(p) == 1, p >= 0, cp.norm(n * p - 1, 2) <= np.sqrt(rho * n)])
    ours, w = _ours(l, ChiSquareBall(rho))
    _close(ours, ref)
    assert float(((n * w - 1) ** 2).sum() / n) <= rho + 1e-9


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rho", [0.05, 0.8])
def test_kl_ball(n: int, rho: float) -> None:
    l = _losses(n, 20 + n)
    p = cp.Variable(n)
    ref = _solve(l @ p, [cp.sum(p) == 1, p >= 0, cp.sum(cp.rel_entr(p, np.full(n, 1.0 / n))) <= rho])
    ours, w = _ours(l, KLBall(rho))
    _close(ours, ref)
    kl = float((w * torch.log(n * w.clamp(min=1e-300))).sum())
    assert kl <= rho + 1e-9


def _majorized(q, sigma_desc: np.ndarray, order: np.ndarray | None) -> list:
    """q in the permutahedron of sigma. With ``order`` (the losses' descending order) q is
    restricted to that order, which loses nothing for a permutation-invariant penalty
    (rearrangement inequality) and makes the majorisation constraints linear; without it, the
    general ``sum_largest`` form (O(n^2) variables)."""
    cums = np.cumsum(sigma_desc)
    n = len(sigma_desc)
    if order is None:
        return [cp.sum(q) == 1] + [cp.sum_largest(q, k) <= cums[k - 1] for k in range(1, n)]
    qs = q[order]
    return [cp.sum(q) == 1, qs[:-1] >= qs[1:], cp.cumsum(qs)[:-1] <= cums[:-1]]


@pytest.mark.parametrize("n,spectrum,lam,div,general", [
    (7, esrm(2.0), 0.05, "chi2", True),
    (7, superquantile(0.5), 0.1, "kl", True),
    (50, extremile(2.5), 0.01, "chi2", False),
    (50, superquantile(0.7), 0.02, "kl", False),
    (400, esrm(1.0), 0.02, "chi2", False),
    (400, extremile(2.0), 0.05, "kl", False),
])
def test_spectral_with_penalty(n: int, spectrum, lam: float, div: str, general: bool) -> None:
    l = _losses(n, 30 + n)
    sigma = spectrum.weights(n).numpy()[::-1].copy()
    q = cp.Variable(n)
    if div == "chi2":
        pen = lam * cp.sum_squares(n * q - 1) / n
    else:
        pen = lam * cp.sum(cp.rel_entr(q, np.full(n, 1.0 / n)))
    ref = _solve(l @ q - pen, _majorized(q, sigma, None if general else np.argsort(-l, kind="stable")))
    ours, w = _ours(l, Spectral(spectrum, lam=lam, divergence=div))
    _close(ours, ref)
    # inside the permutahedron: majorised by sigma
    cums = np.cumsum(np.sort(w.numpy())[::-1])
    assert np.all(cums <= np.cumsum(sigma) + 1e-9)


def test_spectral_without_penalty_is_sorted_dot() -> None:
    l = _losses(50, 3)
    s = extremile(3.0)
    ours, _ = _ours(l, Spectral(s))
    assert abs(ours - float(np.sort(l) @ s.weights(50).numpy())) < 1e-12


@pytest.mark.parametrize("n", [7, 50])
def test_chi_square_penalty_and_ball_plus_penalty(n: int) -> None:
    l = _losses(n, 40 + n)
    lam, rho = 0.3, 0.2
    p = cp.Variable(n)
    ref = _solve(l @ p - lam * cp.sum_squares(n * p - 1) / n, [cp.sum(p) == 1, p >= 0])
    _close(_ours(l, ChiSquarePenalty(lam))[0], ref)
    p = cp.Variable(n)
    ref = _solve(l @ p - lam * cp.sum_squares(n * p - 1) / n,
                 [cp.sum(p) == 1, p >= 0, cp.sum_squares(n * p - 1) / n <= rho])
    _close(_ours(l, ChiSquareBall(rho, lam=lam))[0], ref)


@pytest.mark.parametrize("n", [7, 50])
def test_kl_penalty_and_tv(n: int) -> None:
    l = _losses(n, 50 + n)
    lam = 0.4
    p = cp.Variable(n)
    ref = _solve(l @ p - lam * cp.sum(cp.rel_entr(p, np.full(n, 1.0 / n))), [cp.sum(p) == 1, p >= 0])
    _close(_ours(l, KLPenalty(lam))[0], ref)
    eps = 0.15
    p = cp.Variable(n)
    ref = _solve(l @ p, [cp.sum(p) == 1, p >= 0, 0.5 * cp.norm1(p - 1.0 / n) <= eps])
    _close(_ours(l, TotalVariation(eps))[0], ref)


@pytest.mark.parametrize("n,k", [(7, 3.0), (50, 1.5)])
def test_cressie_read(n: int, k: float) -> None:
    l = _losses(n, 60 + n)
    rho, lam = 0.3, 0.5
    p = cp.Variable(n)
    div = cp.sum(cp.power(n * p, k) - k * n * p + k - 1) / (k * (k - 1) * n)
    ref = _solve(l @ p, [cp.sum(p) == 1, p >= 0, div <= rho])
    _close(_ours(l, CressieRead(k, rho=rho))[0], ref)
    p = cp.Variable(n)
    div = cp.sum(cp.power(n * p, k) - k * n * p + k - 1) / (k * (k - 1) * n)
    ref = _solve(l @ p - lam * div, [cp.sum(p) == 1, p >= 0])
    _close(_ours(l, CressieRead(k, lam=lam))[0], ref)


@pytest.mark.parametrize("n,alpha,r", [(7, 0.2, 0.1), (50, 0.05, 0.3)])
def test_holistic_robust(n: int, alpha: float, r: float) -> None:
    l = _losses(n, 70 + n)
    v = np.append(l, l.max())
    p = cp.Variable(n + 1)
    s = cp.Variable(n)
    q = cp.hstack([1.0 / n - s, cp.reshape(cp.sum(s), (1,), order="C")])
    cons = [cp.sum(p) == 1, p >= 0, s >= 0, s <= 1.0 / n, cp.sum(s) <= alpha, cp.sum(cp.rel_entr(q, p)) <= r]
    prob = cp.Problem(cp.Maximize(v @ p), cons)
    prob.solve(solver=cp.CLARABEL)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
    ours, _ = _ours(l, HolisticRobust(alpha, r))
    _close(ours, float(prob.value), rtol=1e-5)


@pytest.mark.parametrize("n", [7, 50])
def test_kl_smoothed_cvar(n: int) -> None:
    l = _losses(n, 80 + n)
    alpha, s = 0.2, 0.3
    p = cp.Variable(n)
    ref = _solve(l @ p - s * cp.sum(cp.rel_entr(p, np.full(n, 1.0 / n))),
                 [cp.sum(p) == 1, p >= 0, p <= 1.0 / (alpha * n)])
    ours, w = _ours(l, CVaR(alpha, smoothing=s))
    _close(ours, ref)
    assert float(w.max()) <= 1.0 / (alpha * n) + 1e-12

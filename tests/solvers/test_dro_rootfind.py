"""The shared 1-D root-finder of the DRO solvers, the selection-based poisoning of holistic
robustness, and the accuracy of the root-find specs at small radii and large n."""

from __future__ import annotations

import math

import pytest
import torch

from optlayers.solvers.dro import (
    CressieRead,
    HolisticRobust,
    KLBall,
    dual_value,
    robust_weights,
)
from optlayers.solvers.dro._common import newton_bisect
from optlayers.solvers.dro.holistic import holistic_poisoned_weights


def _cubic(c: torch.Tensor):
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x**3 + x - c, 3 * x**2 + 1

    return fn


@pytest.mark.parametrize("feasible", ["hi", "lo", None])
def test_newton_bisect_with_unknown_bracket_ends(feasible: str | None) -> None:
    c = torch.tensor([-300.0, -3.0, 0.0, 1e-9, 2.0, 500.0], dtype=torch.float64)
    inf = torch.full_like(c, math.inf)
    tol = 1e-12
    x, lo, hi, res, conv, iters = newton_bisect(_cubic(c), -inf, inf, torch.zeros_like(c), tol=tol, max_iter=200,
                                                feasible=feasible)
    assert bool(conv.all())
    f = _cubic(c)
    if feasible == "hi":
        fh = f(hi)[0]
        assert bool((fh >= 0).all()) and bool((fh <= tol).all())
    elif feasible == "lo":
        fl = f(lo)[0]
        assert bool((fl <= 0).all()) and bool((fl >= -tol).all())
    else:
        assert bool((f(x)[0].abs() <= tol).all())
    # the bracket is a bracket
    assert bool((f(lo)[0] <= 0).all()) and bool((f(hi)[0] >= 0).all())
    assert int(iters.max()) < 80


def test_newton_bisect_domain_edge_and_iteration_limit() -> None:
    c = torch.tensor([-1e30, 1.0], dtype=torch.float64)  # the first root is far below xmin
    inf = torch.full_like(c, math.inf)
    x, lo, hi, res, conv, _ = newton_bisect(_cubic(c), -inf, inf, torch.zeros_like(c), tol=1e-12, max_iter=200,
                                            feasible="hi", xmin=-50.0)
    assert bool(conv.all())
    assert float(hi[0]) == -50.0  # the best representable point, on the feasible side
    # with one evaluation the search cannot have converged
    _, _, _, _, conv1, _ = newton_bisect(_cubic(c[1:]), -inf[1:], inf[1:], torch.zeros(1, dtype=torch.float64),
                                         tol=1e-12, max_iter=1, feasible="hi")
    assert not bool(conv1.any())


def _poison_reference(L: torch.Tensor, alpha: float) -> torch.Tensor:
    """Removal of mass alpha from the smallest losses, 1/n each in sorted order, tied losses share."""
    n = L.numel()
    vals = sorted(set(L.tolist()))
    q = torch.full_like(L, 1.0 / n)
    left = alpha
    for v in vals:
        idx = (L == v).nonzero().flatten()
        take = min(left, len(idx) / n)
        q[idx] -= take / len(idx)
        left -= take
        if left <= 0:
            break
    return q.clamp(min=0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.1, 1 / 3, 0.37, 0.9, 1.0])
def test_holistic_poisoning_matches_sorted_reference(alpha: float) -> None:
    g = torch.Generator().manual_seed(5)
    for L in (torch.rand(40, generator=g, dtype=torch.float64), torch.randint(0, 5, (30,), generator=g).double(),
              torch.ones(9, dtype=torch.float64)):
        q = holistic_poisoned_weights(L[None], alpha)[0]
        torch.testing.assert_close(q, _poison_reference(L, alpha), rtol=0, atol=1e-15)
        assert math.isclose(float(q.sum()), max(1.0 - alpha, 0.0), abs_tol=1e-14)


def _kl(p: torch.Tensor) -> float:
    n = p.numel()
    return math.fsum(torch.special.xlogy(p, n * p).tolist())


def _cr(p: torch.Tensor, k: float) -> float:
    n = p.numel()
    h = (n * p - 1.0).tolist()
    # (1 + h)^k - 1 - k h, by its binomial series for small h, summed accurately
    total = []
    for x in h:
        if abs(x) < 0.01:
            coef, hp = k * (k - 1.0) / 2.0, x * x
            s = coef * hp
            for j in range(3, 12):
                coef *= (k - j + 1.0) / j
                hp *= x
                s += coef * hp
            total.append(s)
        else:
            total.append((1.0 + x) ** k - 1.0 - k * x)
    return math.fsum(total) / (n * k * (k - 1.0))


@pytest.mark.parametrize("rho", [1e-8, 1e-6, 1e-4])
def test_kl_ball_small_radius_is_accurate(rho: float) -> None:
    # the divergence is a difference of O(1) terms; a noise-limited evaluation stalls near the
    # root (the old evaluation reached only ~1e-8 relative after ~25 iterations)
    g = torch.Generator().manual_seed(2)
    for L in (torch.rand(5000, generator=g, dtype=torch.float64),
              torch.randint(0, 4, (5000,), generator=g).double()):
        res = robust_weights(L, KLBall(rho))
        kl = _kl(res.solution)
        # (an absolute 1e-15: KL of the rounded weights is only that accurate)
        assert abs(kl - rho) <= 1e-9 * rho + 1e-15, (kl, rho)
        assert int(res.iterations) <= 10


@pytest.mark.parametrize("k,rho", [(1.5, 1e-7), (3.0, 1e-6), (3.0, 0.3), (1.2, 0.05)])
def test_cressie_read_ball_divergence_hits_the_radius(k: float, rho: float) -> None:
    g = torch.Generator().manual_seed(4)
    L = torch.randn(3000, generator=g, dtype=torch.float64).exp()
    res = robust_weights(L, CressieRead(k, rho=rho))
    d = _cr(res.solution, k)
    assert abs(d - rho) <= 1e-9 * rho + 1e-15, (d, rho)


@pytest.mark.parametrize("spec", [KLBall(0.5), CressieRead(3.0, rho=0.5), CressieRead(1.5, lam=1.0),
                                  HolisticRobust(0.05, 0.1)])
def test_root_find_specs_at_n_65536(spec: object) -> None:
    g = torch.Generator().manual_seed(0)
    L = torch.rand(1, 65536, generator=g, dtype=torch.float64) * 3.0
    L[0, :100] = L[0, 100:200]  # ties
    res = robust_weights(L, spec)
    p = res.solution
    assert bool((p >= 0).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(1, dtype=torch.float64), rtol=0, atol=1e-12)
    dual = dual_value(L, spec, res.aux.dual)
    gap = (dual - res.aux.value).abs() / res.aux.value.abs()
    assert float(gap.max()) <= 1e-10
    # float32 losses: same weights to float32 precision
    res32 = robust_weights(L.float(), spec)
    torch.testing.assert_close(res32.aux.value.double(), res.aux.value, rtol=1e-6, atol=0)

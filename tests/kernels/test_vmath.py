"""The vectorizable exp/expm1 of optlayers.kernels.vmath_numba against libm (NumPy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("numba")

from optlayers.kernels.vmath_numba import vexp, vexp_array, vexpm1, vexpm1_array  # noqa: E402

pytestmark = pytest.mark.kernels

EPS = np.finfo(np.float64).eps


def _points() -> np.ndarray:
    rng = np.random.default_rng(0)
    ln2 = math.log(2.0)
    # wide range, the reduction's boundaries (half-integer multiples of ln 2), tiny arguments
    edges = np.array([(k + 0.5) * ln2 for k in range(-40, 40)])
    return np.concatenate([rng.uniform(-708, 709, 20000), rng.uniform(-2, 2, 20000), edges,
                           np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf),
                           rng.uniform(-1e-12, 1e-12, 2000), [0.0, -0.0, 1e-300, -1e-300, -700.0, 700.0]])


def test_exp_within_two_ulp() -> None:
    x = _points()
    out = np.empty_like(x)
    vexp_array(x, out)
    ref = np.exp(x)
    assert np.all(np.abs(out - ref) <= 2 * EPS * ref)
    assert vexp(1.0) == pytest.approx(math.e, rel=2 * EPS)


def test_expm1_within_two_ulp_relative_near_zero() -> None:
    x = _points()
    out = np.empty_like(x)
    vexpm1_array(x, out)
    ref = np.expm1(x)
    assert np.all(np.abs(out - ref) <= 2 * EPS * np.abs(ref) + 1e-300)
    assert vexpm1(0.0) == 0.0
    assert vexpm1(1e-10) == pytest.approx(math.expm1(1e-10), rel=2 * EPS)


def test_domain_ends() -> None:
    out = np.empty(4)
    vexp_array(np.array([-800.0, -708.0, 710.0, 800.0]), out)
    assert 0.0 < out[0] == out[1] < 1e-307  # clamped at -708, not 0
    assert np.isinf(out[2]) and np.isinf(out[3])
    vexpm1_array(np.array([-800.0, -40.0, -1.0, 1.0]), out)
    assert out[0] == -1.0 and out[1] == pytest.approx(math.expm1(-40.0), rel=2 * EPS)

"""The Numba 1-D root-find kernels of the DRO solvers against their PyTorch references, and the
dispatch reporting the backend that ran."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import optlayers.kernels._dispatch as D
from optlayers.kernels import Backend, last_backend
from optlayers.solvers.dro import CressieRead, HolisticRobust, KLBall, robust_weights

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")

CASES = [
    (KLBall(0.5), "dro.kl_ball_root"),
    (KLBall(1e-6), "dro.kl_ball_root"),
    (CressieRead(3.0, rho=0.5), "dro.cr_ball_root"),
    (CressieRead(1.5, rho=1e-7), "dro.cr_ball_root"),  # the term-by-term divergence branch
    (CressieRead(1.5, lam=1.0), "dro.cr_penalty_root"),
    (CressieRead(3.0, lam=0.1), "dro.cr_penalty_root"),
    (HolisticRobust(0.05, 0.1), "dro.holistic_root"),
    (HolisticRobust(0.2, 1.0), "dro.holistic_root"),
]


def _rows(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "ties":
        L = torch.randint(0, 4, (3, 60), generator=g).double()
        L[1] = 2.0  # an all-equal row (inactive)
        return L
    return torch.rand(4, 257, generator=g, dtype=torch.float64) * 3.0


@needs_numba
@pytest.mark.kernels
@pytest.mark.parametrize("spec,kernel", CASES)
@pytest.mark.parametrize("rows", ["random", "ties"])
def test_root_kernels_match_reference(spec, kernel: str, rows: str) -> None:
    L = _rows(rows)
    ref = robust_weights(L, spec, backend="reference")
    assert last_backend(kernel) is Backend.REFERENCE
    nb = robust_weights(L, spec, backend="numba")
    assert last_backend(kernel) is Backend.NUMBA
    assert ref.converged.all() and nb.converged.all()
    # both searches stop within the same tolerance on the same side of the root
    torch.testing.assert_close(nb.solution, ref.solution, rtol=0, atol=1e-11)
    torch.testing.assert_close(nb.aux.value, ref.aux.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(nb.aux.dual.lam, ref.aux.dual.lam, rtol=1e-8, atol=1e-12)
    # the compiled sums are reassociated (vectorized): near the tolerance their last-bit rounding
    # can cost or save a Newton step or two
    assert (nb.iterations - ref.iterations).abs().max() <= 2


@needs_numba
@pytest.mark.kernels
@pytest.mark.parametrize("spec,kernel", CASES[::2])
def test_root_kernels_dispatch_and_iteration_limit(spec, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    L = _rows("random").float()
    monkeypatch.delenv(D.ENV_VAR, raising=False)  # this test sets the override itself
    robust_weights(L, spec)  # automatic on the CPU: Numba
    assert last_backend(kernel) is Backend.NUMBA
    monkeypatch.setenv(D.ENV_VAR, "reference")
    robust_weights(L, spec)
    assert last_backend(kernel) is Backend.REFERENCE
    monkeypatch.delenv(D.ENV_VAR)
    # a limit of one evaluation: the same flags from both backends, weights still on the simplex
    a = robust_weights(L.double(), spec, max_iter=1, throw=False, backend="reference")
    b = robust_weights(L.double(), spec, max_iter=1, throw=False, backend="numba")
    assert a.converged.tolist() == b.converged.tolist()
    assert not bool(b.converged.all())
    torch.testing.assert_close(b.solution.sum(-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.solution, a.solution, rtol=0, atol=1e-12)

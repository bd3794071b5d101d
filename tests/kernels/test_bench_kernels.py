"""CPU-side checks of the GPU kernel benchmark (benchmarks/bench_kernels.py): it imports, refuses
to run without a card, and the argument mappings to the competitors' soft-mins are right.

The competitors only run on CUDA, so the mappings are checked against each library's documented
formula evaluated densely here (GeomLoss: ``−ε log Σ_j exp(h'_j − ‖x'_i − y'_j‖²/(2ε))``;
FlashSinkhorn's ``flashsinkhorn_lse``: ``−ε log Σ_j exp(2 x_i·y_j/ε + bias_j)``), in float64,
against the optlayers reference soft-min.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from optlayers.kernels.softmin_reference import SqEuclideanSource, softmin_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", ROOT / "benchmarks" / "bench_kernels.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _case(seed: int, n: int, m: int, d: int, eps: float):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = 0.5 + 0.3 * torch.randn(m, d, generator=g, dtype=torch.float64)
    h = 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    ref = softmin_reference(SqEuclideanSource(x[None], y[None]), h[None], torch.tensor([eps], dtype=torch.float64))[0]
    return x, y, h, ref


@pytest.mark.parametrize("n,m,d,eps", [(7, 5, 2, 0.01), (1, 3, 3, 0.5), (13, 17, 1, 2.0)])
def test_geomloss_mapping(bench, n: int, m: int, d: int, eps: float) -> None:  # noqa: ANN001
    x, y, h, ref = _case(n + m, n, m, d, eps)
    gx, gy, gh = bench.geomloss_inputs(x, y, h, eps)
    assert gx.shape == (1, n, d) and gy.shape == (1, m, d) and gh.shape == (1, m)
    c_half = ((gx[0, :, None, :] - gy[0, None, :, :]) ** 2).sum(-1) / 2  # GeomLoss's p=2 cost
    f = -eps * torch.logsumexp(gh[0][None, :] - c_half / eps, -1)
    assert torch.allclose(f, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,m,d,eps", [(7, 5, 2, 0.01), (1, 3, 3, 0.5), (13, 17, 1, 2.0)])
def test_flash_sinkhorn_mapping(bench, n: int, m: int, d: int, eps: float) -> None:  # noqa: ANN001
    x, y, h, ref = _case(2 * n + m, n, m, d, eps)
    bias = bench.flash_bias(y, h, eps)
    assert bias.shape == (m,)
    shifted = -eps * torch.logsumexp(2.0 * (x @ y.T) / eps + bias[None, :], -1)  # flashsinkhorn_lse, cost_scale=1
    assert torch.allclose(bench.flash_unshift(shifted, x), ref, rtol=1e-10, atol=1e-10)


def test_competitor_rows_are_well_formed(bench) -> None:  # noqa: ANN001
    x, y, h, _ = _case(0, 4, 3, 2, 0.1)
    rows = bench._competitor_softmins(x.float(), y.float(), h.float(), 0.1)
    libs = [lib for lib, _, _ in rows]
    assert any(lib.startswith("GeomLoss") for lib in libs) and any(lib.startswith("flash-sinkhorn") for lib in libs)
    for _, call, note in rows:
        assert call is None or callable(call)
        assert call is not None or note.startswith("not run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA card")
def test_cuda_run_refuses_without_a_card(bench) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.run(device="cuda")

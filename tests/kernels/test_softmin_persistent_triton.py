"""The persistent Triton Sinkhorn kernel (all iterations of many small problems in one launch)
against the reference solver, under ``TRITON_INTERPRET=1`` at tiny sizes."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optlayers.solvers.ot import CostMatrix, sinkhorn

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
FORCED = os.environ.get("OPTLAYERS_KERNELS", "")


def _problems(B: int, n: int, m: int, dtype: torch.dtype, seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(B, m, 2, generator=g, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    eps = torch.linspace(0.05, 0.2, B, dtype=torch.float64)
    return C.to(dtype), a.to(dtype), b.to(dtype), eps.to(dtype)


@pytest.mark.kernels
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(FORCED.lower() not in ("", "auto", "reference", "triton"),
                    reason="the interpreter test runs once, in the reference/automatic pass")
def test_persistent_kernel_matches_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        # TRITON_INTERPRET is read when a kernel is first compiled: run in a fresh process
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        env.pop("OPTLAYERS_KERNELS", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_persistent_kernel_matches_solver"],
                              env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout
        return
    import optlayers.kernels.softmin_persistent_triton as P

    # poisoned outputs: every entry must be written
    monkeypatch.setattr(P, "_alloc", lambda *s, dtype, device: torch.full(
        s, -7 if dtype == torch.int32 else math.nan, dtype=dtype, device=device))
    for (B, n, m), dtype, tol in [((3, 5, 7), torch.float64, 1e-9), ((2, 1, 3), torch.float64, 1e-9),
                                  ((2, 17, 9), torch.float32, 1e-4)]:
        C, a, b, eps = _problems(B, n, m, dtype, seed=n * m)
        f, g, its, err = P.sinkhorn_persistent_triton(C, a, b, eps, tol=tol, max_iter=2000)
        assert f.shape == (B, n) and g.shape == (B, m) and its.dtype == torch.int32
        ref = sinkhorn(a, b, CostMatrix(C), epsilon=eps, tol=tol, max_iter=2000)
        assert torch.equal(its.long(), ref.iterations.long())  # same iterates, same stopping rule
        atol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(f, ref.solution[0], atol=atol, rtol=0)
        torch.testing.assert_close(g, ref.solution[1], atol=atol, rtol=0)
        torch.testing.assert_close(err, ref.residual.to(dtype), atol=atol * 10, rtol=1e-3)
        assert bool((err <= tol).all())
    # the iteration limit: stops after max_iter, reports the error then
    C, a, b, eps = _problems(2, 6, 6, torch.float64, seed=1)
    f, g, its, err = P.sinkhorn_persistent_triton(C, a, b, eps * 0.1, tol=1e-14, max_iter=3)
    assert its.tolist() == [3, 3] and bool((err > 1e-14).all())
    ref = sinkhorn(a, b, CostMatrix(C), epsilon=eps * 0.1, tol=1e-14, max_iter=3, throw=False)
    torch.testing.assert_close(f, ref.solution[0], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="n, m"):
        P.sinkhorn_persistent_triton(torch.zeros(1, P.MAX_SIDE + 1, 2), torch.ones(1, P.MAX_SIDE + 1),
                                     torch.ones(1, 2), torch.ones(1), tol=1e-3, max_iter=5)

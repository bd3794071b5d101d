"""The k-sparse simplex projection kernel (reference, Numba, Triton) and the fused sparse-OT dual kernel."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optlayers.kernels._dispatch as D
from optlayers.kernels import Backend, KernelUnavailableError, dispatch, last_backend, registered_backends
from optlayers.kernels.sparse_ot_dual import DUAL_KERNEL_NAME, LBFGS_KERNEL_NAME, sparse_ot_dual_reference
from optlayers.kernels.sparse_simplex import (
    KERNEL_NAME,
    sparse_simplex_reference,
    sparse_simplex_to_dense,
)
from optlayers.solvers.projections import project_simplex, project_sparse_simplex

HAS_NUMBA = D.backend_available(Backend.NUMBA)
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1, 1), (5, 7, 3), (4, 30, 30), (4, 30, 45), (6, 100, 1), (3, 200, 64), (3, 200, 65), (2, 300, 150)]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ENV_VAR, raising=False)


def _dense(fn, x, k, s, offset=None):
    v, i = fn(x, k, s) if offset is None else fn(x, k, s, offset)
    assert v.shape == i.shape == (x.shape[0], min(k, x.shape[1]))
    assert v.dtype == x.dtype and i.dtype == torch.int64
    return sparse_simplex_to_dense(v, i, x.shape[1])


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def test_registered_lazily() -> None:
    assert set(registered_backends(KERNEL_NAME)) == {Backend.REFERENCE, Backend.NUMBA, Backend.TRITON}
    assert set(registered_backends(DUAL_KERNEL_NAME)) == {Backend.REFERENCE, Backend.NUMBA}
    assert set(registered_backends(LBFGS_KERNEL_NAME)) == {Backend.NUMBA}  # spec: the PyTorch solver loop
    # bare parent packages, so that only the modules of this feature (and what they import) load
    code = ("import sys, types\n"
            f"root = {str(ROOT)!r}\n"
            "for name in ('optlayers', 'optlayers.solvers', 'optlayers.layers'):\n"
            "    pkg = types.ModuleType(name); pkg.__path__ = [root + '/' + name.replace('.', '/')]\n"
            "    sys.modules[name] = pkg\n"
            "import optlayers.kernels.sparse_simplex, optlayers.kernels.sparse_ot_dual\n"
            "import optlayers.solvers.sparse_ot, optlayers.layers.sparse_ot\n"
            "print('numba' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("R,n,k", SHAPES)
def test_reference_matches_projections_module(R: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(R * n + k)
    x = torch.randn(R, n, generator=g, dtype=torch.float64)
    s = torch.rand(R, generator=g, dtype=torch.float64) * 2
    expected = project_sparse_simplex(x, k, s) if k < n else project_simplex(x, s)
    torch.testing.assert_close(_dense(sparse_simplex_reference, x, k, s), expected, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 4), n=st.integers(1, 12), k=st.integers(1, 14), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_reference_properties(R: int, n: int, k: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n, generator=g, dtype=torch.float64) * scale
    s = torch.rand(R, generator=g, dtype=torch.float64) * scale
    p = _dense(sparse_simplex_reference, x, k, s)
    assert bool((p >= 0).all())
    assert bool(((p > 0).sum(-1) <= k).all())
    torch.testing.assert_close(p.sum(-1), s, rtol=1e-10, atol=1e-12 * scale)
    # optimality: no other k-sparse point of the simplex is closer (compare with the exact projection)
    torch.testing.assert_close(p, project_sparse_simplex(x, k, s) if k < n else project_simplex(x, s),
                               rtol=1e-10, atol=1e-10 * scale)


def test_ties_keep_at_most_k() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, -1.0, 2.0]])
    s = torch.ones(3)
    fns = [sparse_simplex_reference]
    if HAS_NUMBA:
        from optlayers.kernels.sparse_simplex_numba import sparse_simplex_numba
        fns.append(sparse_simplex_numba)
    for fn in fns:
        p = _dense(fn, x, 2, s)
        assert bool(((p > 0).sum(-1) <= 2).all())
        torch.testing.assert_close(p.sum(-1), s)


def test_argument_checks() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        sparse_simplex_reference(x, 0, torch.ones(3))
    with pytest.raises(ValueError, match="s must be a tensor of shape"):
        sparse_simplex_reference(x, 2, torch.ones(4))
    with pytest.raises(ValueError, match="offset must be"):
        sparse_simplex_reference(x, 2, torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="floating tensor of shape"):
        sparse_simplex_reference(torch.ones(3, 4, dtype=torch.int64), 2, torch.ones(3))


@pytest.mark.kernels
@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,n,k", SHAPES)
def test_numba_matches_reference(R: int, n: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7 * R + n + k)
    x = torch.randn(R, n, generator=g, dtype=torch.float64).to(dtype)
    s = (torch.rand(R, generator=g, dtype=torch.float64) * 2).to(dtype)
    s[0] = 0.0
    fn = dispatch(KERNEL_NAME, backend="numba")
    got = _dense(fn, x, k, s)
    assert last_backend(KERNEL_NAME) is Backend.NUMBA
    ref = _dense(sparse_simplex_reference, x, k, s)
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=_tol(dtype) * max(1.0, float(s.max())))


@pytest.mark.kernels
@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_offset_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    for R, n, k, G in [(6, 7, 3, 2), (12, 100, 5, 3), (8, 50, 50, 8), (6, 100, 80, 1)]:
        x = torch.randn(R, n, generator=g, dtype=dtype)
        s = torch.rand(R, generator=g, dtype=dtype)
        off = torch.randn(G, n, generator=g, dtype=dtype)
        got = _dense(dispatch(KERNEL_NAME, backend=Backend.NUMBA), x, k, s, off)
        torch.testing.assert_close(got, _dense(sparse_simplex_reference, x, k, s, off), rtol=0, atol=_tol(dtype))


@pytest.mark.kernels
@needs_numba
def test_numba_parallel_path_and_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import numba

    from optlayers.kernels import sparse_ot_dual_numba as MD
    from optlayers.kernels import sparse_simplex_numba as M

    g = torch.Generator().manual_seed(5)
    x, s = torch.randn(40, 60, generator=g, dtype=torch.float64), torch.rand(40, generator=g, dtype=torch.float64)
    al, be = torch.randn(1, 60, generator=g, dtype=torch.float64), torch.randn(1, 40, generator=g, dtype=torch.float64)
    K = x.abs().unsqueeze(0)
    before = torch.get_num_threads()
    try:
        # a serial call never starts Numba's OpenMP pool, which would reset torch's thread count
        torch.set_num_threads(1)
        M.sparse_simplex_numba(x, 4, s)
        MD.sparse_ot_dual_numba(al, be, K, 3)
        assert torch.get_num_threads() == 1
        if numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("one numba thread")
        monkeypatch.setattr(M, "PARALLEL_MIN", 1)
        monkeypatch.setattr(MD, "PARALLEL_MIN", 1)
        torch.set_num_threads(1)  # one torch thread: the parallel path is not taken
        assert M.parallel_threads() == 1
        torch.set_num_threads(2)
        nb = numba.get_num_threads()
        got = _dense(M.sparse_simplex_numba, x, 4, s)
        torch.testing.assert_close(got, _dense(sparse_simplex_reference, x, 4, s))
        for u, v in zip(MD.sparse_ot_dual_numba(al, be, K, 3), sparse_ot_dual_reference(al, be, K, 3), strict=True):
            torch.testing.assert_close(u, v)
        assert torch.get_num_threads() == 2 and numba.get_num_threads() == nb  # both left as they were
    finally:
        torch.set_num_threads(before)


@pytest.mark.kernels
def test_forced_backends_recorded_and_never_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    x, s = torch.randn(3, 5), torch.ones(3)
    dispatch(KERNEL_NAME, backend="reference")(x, 2, s)
    assert last_backend(KERNEL_NAME) is Backend.REFERENCE
    with pytest.raises(KernelUnavailableError, match="cannot run on a cpu"):
        dispatch(KERNEL_NAME, backend="triton", device="cpu")
    with pytest.raises(KernelUnavailableError):
        dispatch(DUAL_KERNEL_NAME, backend="triton", device="cuda")
    if HAS_NUMBA:
        monkeypatch.setenv(D.ENV_VAR, "numba")
        dispatch(KERNEL_NAME, device="cpu", size=1)(x, 2, s)
        assert last_backend(KERNEL_NAME) is Backend.NUMBA


@pytest.mark.kernels
@needs_triton
def test_triton_interpreter_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when kernels are first compiled; run in a fresh process
        # so an earlier import in this session cannot leave compiled (non-interpreted) kernels.
        import subprocess

        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_triton_interpreter_matches_reference"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return
    name = "optlayers.kernels.sparse_simplex_triton"
    mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    g = torch.Generator().manual_seed(11)
    cases = [(torch.float64, 5, 7, 3, None), (torch.float32, 4, 30, 45, None), (torch.float32, 3, 40, 1, None),
             (torch.float16, 3, 17, 4, None), (torch.float64, 6, 20, 5, 2)]
    for dtype, R, n, k, G in cases:
        x = torch.randn(R, n, generator=g, dtype=torch.float64).to(dtype)
        s = torch.rand(R, generator=g, dtype=torch.float64).to(dtype)
        off = None if G is None else torch.randn(G, n, generator=g, dtype=torch.float64).to(dtype)
        got = _dense(mod.sparse_simplex_triton, x, k, s, off)
        ref = _dense(sparse_simplex_reference, x, k, s, off)
        torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=_tol(dtype))
    # through the dispatch (declared for CUDA; the interpreter runs the CPU tensors)
    fn = dispatch(KERNEL_NAME, backend="triton", device="cuda")
    x = torch.randn(2, 9, generator=g, dtype=torch.float64)
    got = _dense(fn, x, 3, torch.ones(2, dtype=torch.float64))
    assert last_backend(KERNEL_NAME) is Backend.TRITON
    torch.testing.assert_close(got, _dense(sparse_simplex_reference, x, 3, torch.ones(2, dtype=torch.float64)))


@pytest.mark.kernels
@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_dual_numba_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    fn = dispatch(DUAL_KERNEL_NAME, backend="numba")
    for B, m, n, kk in [(2, 5, 7, 3), (1, 30, 40, 40), (3, 20, 10, 2), (1, 40, 60, 1)]:
        al = torch.randn(B, n, generator=g, dtype=dtype)
        be = torch.randn(B, m, generator=g, dtype=dtype)
        K = torch.rand(B, m, n, generator=g, dtype=dtype) * 3
        got = fn(al, be, K, kk)
        assert last_backend(DUAL_KERNEL_NAME) is Backend.NUMBA
        ref = sparse_ot_dual_reference(al, be, K, kk)
        for u, v in zip(got[:3], ref[:3]):
            torch.testing.assert_close(u, v, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-4)
        assert torch.equal(got[3], ref[3])


@needs_numba
@pytest.mark.parametrize("n,k,mass", [(40, 3, 0.05), (40, 3, 30.0), (200, 90, 0.5), (200, 90, 50.0),
                                      (30, 30, 0.02), (30, 50, 10.0), (1, 1, 0.3)])
def test_fused_lbfgs_oracles_match_reference(n: int, k: int, mass: float) -> None:
    """Value and gradient of the compiled L-BFGS kernel's oracles against the reference kernels:
    the heap path (``k <= 64``), the candidate path (``k > 64``), ``k >= n``, small and large masses."""
    import numpy as np

    from optlayers.kernels.sparse_ot_dual_lbfgs_numba import _dual_oracle, _semi_oracle

    g = torch.Generator().manual_seed(n + k)
    m, gam = 17, 0.3
    K = torch.rand(m, n, generator=g, dtype=torch.float64)
    z = torch.randn(n + m, generator=g, dtype=torch.float64) * 0.5
    bm = torch.full((m,), mass, dtype=torch.float64)
    a = torch.full((n,), mass * m / n, dtype=torch.float64)
    kk = min(k, n)
    # semi-dual: the plan's columns are the k-sparse projections of (α − K_j)/γ onto mass b_j
    V, I = sparse_simplex_reference(K / gam, kk, bm, (z[:n] / gam)[None])
    P = sparse_simplex_to_dense(V, I, n)
    grad = P.sum(0) - a
    S = -(z[:n] * grad).sum() + (P * (K + 0.5 * gam * P)).sum()
    gn = np.empty(n)
    buf = (np.empty(n), np.empty(n, dtype=np.int64), np.empty(kk), np.empty(kk, dtype=np.int64))
    f, viol, binding = _semi_oracle(z[:n].numpy(), K.numpy(), a.numpy(), bm.numpy(), gam, kk, gn, *buf)
    assert np.allclose(gn, grad.numpy(), atol=1e-12) and abs(f + float(S)) < 1e-10 * max(1.0, abs(float(S)))
    assert abs(viol - float(grad.abs().sum())) < 1e-10 and binding == (kk < n and bool(((P > 0).sum(1) >= kk).any()))
    # dual
    r_n, r_m, inner, bind = sparse_ot_dual_reference(z[None, :n], z[None, n:], K[None], kk)
    gd = torch.cat([r_n[0] / gam - a, r_m[0] / gam - bm])
    D_ = -(z * gd).sum() + inner[0] / gam
    gdn = np.empty(n + m)
    f, viol, binding = _dual_oracle(z.numpy(), K[None].numpy(), a.numpy(), bm.numpy(), gam, kk, gdn,
                                    np.zeros((1, n)), np.zeros((1, m)))
    assert np.allclose(gdn, gd.numpy(), atol=1e-12) and abs(f + float(D_)) < 1e-10 * max(1.0, abs(float(D_)))
    assert binding == bool(bind[0])

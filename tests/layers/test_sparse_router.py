"""SparseOTRouter: capacities, layouts, gradients, load balance against top-k gating, the example."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from optlayers import ConvergenceError
from optlayers.layers.sparse_ot import SparseOTRouter, sparse_ot_route, topk_gating
from optlayers.solvers.sparse_ot import DualLBFGS

ROOT = Path(__file__).resolve().parents[2]


def _logits(G: int = 3, S: int = 24, E: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, S, E, generator=g, dtype=dtype) * 2


def test_expert_capacity_layout_and_balance() -> None:
    lg = _logits()
    res = sparse_ot_route(lg, capacity_factor=1.25)
    dispatch, combine = res.solution
    C = int(res.aux.capacity)
    assert C == 8 and dispatch.shape == combine.shape == (3, 24, 4, C)
    assert bool(((dispatch == 0) | (dispatch == 1)).all())
    per_expert = dispatch.sum((1, 3))
    assert bool((per_expert <= C).all())
    assert torch.equal(per_expert, res.aux.expert_load)
    assert bool((dispatch.sum(-1) <= 1).all())  # a token uses at most one slot of an expert
    assert bool(((combine > 0) == (dispatch > 0)).all())
    # each expert receives exactly its share S/E = 6 of the token mass (semi-dual: exact marginal)
    torch.testing.assert_close(combine.sum((1, 3)), torch.full((3, 4), 6.0, dtype=torch.float64))
    torch.testing.assert_close(res.aux.plan.to_dense(), combine.sum(-1))
    assert res.converged.shape == (3,) and bool(res.converged.all())


def test_token_mode_at_most_k_experts() -> None:
    lg = _logits(seed=1)
    res = sparse_ot_route(lg, sparsity="token", k=2)
    dispatch, combine = res.solution
    assert bool(((dispatch.sum((2, 3))) <= 2).all())
    # tokens are routed in full (row marginal exact) unless they overflow a capacity
    kept = dispatch.sum((2, 3)) == (res.aux.plan.to_dense() > 0).sum(-1)
    torch.testing.assert_close(combine.sum((2, 3))[kept], torch.ones_like(combine.sum((2, 3))[kept]))


def test_gradients_flow_to_the_gate() -> None:
    router = SparseOTRouter(6, 4, capacity_factor=1.5, gamma=1.0).double()
    x = torch.randn(2, 16, 6, dtype=torch.float64)
    dispatch, combine = router(x)
    target = torch.randn_like(combine)
    (combine * target).sum().backward()
    assert router.gate.weight.grad is not None and bool(torch.isfinite(router.gate.weight.grad).all())
    assert float(router.gate.weight.grad.abs().sum()) > 0
    # the implicit gradient of the routing weights matches finite differences in the logits
    lg = _logits(G=1, S=8, E=3, seed=2).requires_grad_(True)

    def f(lg: torch.Tensor) -> torch.Tensor:
        return sparse_ot_route(lg, capacity=6, gamma=2.0, tol=1e-12).solution[1].sum(-1)

    assert torch.autograd.gradcheck(f, (lg,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_batched_groups_equal_single_groups() -> None:
    lg = _logits(G=3, seed=3)
    full = sparse_ot_route(lg).solution[1]
    for g in range(3):
        one = sparse_ot_route(lg[g]).solution[1]
        torch.testing.assert_close(full[g], one, rtol=1e-6, atol=1e-8)


def test_load_balance_beats_topk_gating() -> None:
    lg = _logits(G=4, S=64, E=8, seed=4, dtype=torch.float32) + torch.linspace(0, 2, 8)  # skewed experts
    d_ot, _ = sparse_ot_route(lg, capacity_factor=1.0).solution
    d_top, _ = topk_gating(lg, 1, capacity_factor=1.0)
    load_ot, load_top = d_ot.sum((1, 3)), d_top.sum((1, 3))
    dropped_ot = int((d_ot.sum((2, 3)) == 0).sum())
    dropped_top = int((d_top.sum((2, 3)) == 0).sum())
    assert float(load_ot.std()) < float(load_top.std())
    assert dropped_ot < dropped_top


def test_module_state_dict_roundtrip_and_options() -> None:
    router = SparseOTRouter(5, 3, sparsity="token", k=2, gamma=0.3)
    buf = io.BytesIO()
    torch.save(router.state_dict(), buf)
    other = SparseOTRouter(5, 3, sparsity="token", k=2, gamma=0.3)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(2, 9, 5)
    torch.testing.assert_close(router(x)[1], other(x)[1])
    assert "num_experts=3" in repr(router)
    res = router.solve(x)
    assert res.aux.expert_load.shape == (2, 3) and res.aux.dropped.shape == (2,)
    with pytest.raises(ValueError, match="'expert', 'token'"):
        SparseOTRouter(5, 3, sparsity="tokens")
    with pytest.raises(ValueError, match="capacity must be"):
        sparse_ot_route(torch.randn(4, 3), capacity=0)
    with pytest.raises(ConvergenceError):
        sparse_ot_route(_logits(), solver=DualLBFGS(max_iter=1), gamma=0.01)


def test_example_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process (a fresh interpreter would spend most of the time importing torch again)
    import contextlib
    import importlib.util

    pytest.importorskip("matplotlib")
    path = ROOT / "examples" / "sparse_ot_routing.py"
    spec = importlib.util.spec_from_file_location("sparse_ot_routing_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["sparse_ot_routing.py", "--quick", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)  # the example runs single-threaded
    out = capsys.readouterr().out
    assert (tmp_path / "plans.png").exists() and (tmp_path / "moe_load.png").exists()
    assert "load" in out and "accuracy" in out and "k = 2" in out and "quadratic" in out
    with contextlib.suppress(ImportError):
        import matplotlib.pyplot as plt

        plt.close("all")


def test_compiled_solve_routes_like_the_torch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups large enough for the compiled L-BFGS kernel: loads and drops read off the compact
    plan equal those of the slot tensors, and the routing equals the PyTorch loop's."""
    pytest.importorskip("numba")
    import importlib

    from optlayers.kernels import Backend, call_count
    from optlayers.kernels.sparse_ot_dual import LBFGS_KERNEL_NAME

    lg = _logits(G=2, S=128, E=16, seed=4)  # 2 x 16 x 128 = 4,096 cost entries
    count = call_count(LBFGS_KERNEL_NAME, Backend.NUMBA)
    res = sparse_ot_route(lg, capacity_factor=1.25)
    assert call_count(LBFGS_KERNEL_NAME, Backend.NUMBA) == count + 1
    dispatch, combine = res.solution
    assert torch.equal(res.aux.expert_load, dispatch.sum((1, 3)))
    assert torch.equal(res.aux.dropped, (dispatch.sum((2, 3)) == 0).sum(-1))
    assert bool((res.aux.expert_load <= int(res.aux.capacity)).all())
    monkeypatch.setattr(importlib.import_module("optlayers.solvers.sparse_ot.sparse_ot"), "_fused_lbfgs",
                        lambda *args: None)
    ref = sparse_ot_route(lg, capacity_factor=1.25)
    assert call_count(LBFGS_KERNEL_NAME, Backend.NUMBA) == count + 1
    assert torch.allclose(combine, ref.solution[1], atol=1e-6)

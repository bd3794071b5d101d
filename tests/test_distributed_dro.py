"""DRO losses under real 2-process ``gloo`` DDP on CPU: global-batch weights.

Two ranks with uneven local batches (5 and 7 examples) must give exactly the gradient of one
process on the concatenated batch of 12 (to 1e-12), while the naive per-rank robust loss does
not. Group DRO weights must stay identical across ranks.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optlayers.layers.dro import DROLoss, GroupDROLoss
from optlayers.solvers.dro import ChiSquareBall, CVaR, KLBall, Spectral, esrm

SIZES = (5, 7)
SPECS = {
    "cvar": CVaR(0.3),
    "chi2": ChiSquareBall(1.0),
    "kl": KLBall(0.4),
    "spectral": Spectral(esrm(2.0), lam=0.05),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0, 1, 0, 0])
    return x, y, groups


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(-1) - y) ** 2


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, groups = _data()
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        ddp = nn.parallel.DistributedDataParallel(_model())
        out: dict[str, object] = {}
        for name, spec in SPECS.items():
            for mode, pg in (("global", "world"), ("naive", None)):
                ddp.zero_grad()
                value = DROLoss(spec, process_group=pg)(_losses(ddp, x[sl], y[sl]))
                value.backward()
                out[f"{name}/{mode}"] = _grads(ddp.module)
                out[f"{name}/{mode}/value"] = value.detach()
        gdro = GroupDROLoss(3, step_size=0.5, process_group="world")
        for step in range(3):
            ddp.zero_grad()
            gdro(_losses(ddp, x[sl], y[sl]), group_ids=groups[sl]).backward()
            out[f"group/{step}"] = _grads(ddp.module)
        out["group/q"] = gdro.q.clone()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks saved; no collective is pending
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # no group teardown: ~ProcessGroupGloo can deadlock on the GIL (see test_distributed_moe)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single_process(spec) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = _data()
    model = _model()
    value = DROLoss(spec)(_losses(model, x, y))
    value.backward()
    return _grads(model), value.detach()


@pytest.mark.parametrize("name", list(SPECS))
def test_ddp_gradient_equals_full_batch(ddp_results: list[dict], name: str) -> None:
    ref, ref_value = _single_process(SPECS[name])
    for r in range(2):
        g = ddp_results[r][f"{name}/global"]
        assert torch.allclose(g, ref, rtol=0, atol=1e-12), (g - ref).abs().max()
        assert torch.allclose(ddp_results[r][f"{name}/global/value"], ref_value, rtol=0, atol=1e-12)
    # the naive per-rank robust loss optimises another objective: its gradient differs
    naive = ddp_results[0][f"{name}/naive"]
    diff = float((naive - ref).abs().max())
    assert diff > 1e-3, f"naive per-rank gradient unexpectedly matches (max diff {diff:.2e})"


def test_group_dro_ddp_matches_single_process(ddp_results: list[dict]) -> None:
    x, y, groups = _data()
    model = _model()
    gdro = GroupDROLoss(3, step_size=0.5)
    for step in range(3):
        model.zero_grad()
        gdro(_losses(model, x, y), group_ids=groups).backward()
        ref = _grads(model)
        for r in range(2):
            assert torch.allclose(ddp_results[r][f"group/{step}"], ref, rtol=0, atol=1e-12)
    assert torch.equal(ddp_results[0]["group/q"], ddp_results[1]["group/q"])
    assert torch.allclose(ddp_results[0]["group/q"], gdro.q, rtol=0, atol=1e-14)

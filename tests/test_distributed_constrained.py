"""Lagrange multipliers under real 2-process ``gloo`` DDP: identical on every rank, and equal to one
process on the concatenated batch (dense Lagrangian, augmented Lagrangian, and indexed multipliers)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optlayers.layers.constrained import (
    AugmentedLagrangian,
    ConstrainedOptimizer,
    ConstrainedProblem,
    Constraint,
    ConstraintState,
    GradientAscent,
    NuPI,
    PenaltySchedule,
    ProblemState,
    check_synchronized,
)

N, STEPS = 16, 6
DT = torch.float64


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, 3, generator=g, dtype=DT)
    y = (X[:, 0] + 0.3 * torch.randn(N, generator=g, dtype=DT) > 0).to(DT)
    return X, y


class RateProblem(ConstrainedProblem):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rate = Constraint("ineq", dtype=DT)
        self.rate_al = Constraint("ineq", formulation=AugmentedLagrangian(2.0, PenaltySchedule(1.5, tol=1e-3)),
                                  dtype=DT, dual=GradientAscent(0.5))
        self.margin = Constraint("ineq", num_samples=N, dtype=DT)

    def compute(self, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> ProblemState:
        logits = self.model(X).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits)
        margin = 0.5 - logits * (2 * y - 1)
        return ProblemState(loss, {
            "rate": ConstraintState(p.mean() - 0.3, (logits > 0).to(DT).mean() - 0.3),
            "rate_al": ConstraintState(p.mean() - 0.35),
            # per-sample proxy scaled by the local batch (DDP averages gradients); strict unscaled
            "margin": ConstraintState(margin / X.shape[0], margin.detach(), indices=idx),
        })


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1).to(DT)


def _run(problem: RateProblem, params, X, y, idx) -> list[dict[str, torch.Tensor]]:
    opt = ConstrainedOptimizer(problem, torch.optim.SGD(params, lr=0.5), dual=NuPI(0.3, kp=0.5, ki=1.0, nu=0.3))
    out = []
    for _ in range(STEPS):
        opt.step(X, y, idx)
        out.append({k: v.clone() for k, v in problem.state_dict().items() if not k.startswith("model")})
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        X, y = _data()
        sl = slice(rank * N // world, (rank + 1) * N // world)
        ddp = nn.parallel.DistributedDataParallel(_model())
        problem = RateProblem(ddp)
        traj = _run(problem, ddp.parameters(), X[sl], y[sl], torch.arange(N)[sl])
        check_synchronized(problem)
        torch.save(traj, os.path.join(out_dir, f"rank{rank}.pt"))
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
def ddp_trajectories(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp_constrained")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_multipliers_identical_across_ranks_every_step(ddp_trajectories):
    r0, r1 = ddp_trajectories
    assert len(r0) == len(r1) == STEPS
    for s0, s1 in zip(r0, r1, strict=False):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k


def test_multipliers_equal_single_process_on_concatenated_batch(ddp_trajectories):
    X, y = _data()
    model = _model()
    ref = _run(RateProblem(model), model.parameters(), X, y, torch.arange(N))
    moved = False
    for step, (got, want) in enumerate(zip(ddp_trajectories[0], ref, strict=False)):
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), (step, k, (got[k] - want[k]).abs().max())
        moved = moved or bool(want["rate.multiplier"] > 0) and bool(want["margin.multiplier"].max() > 0)
    assert moved  # the constraints were active, so the comparison is not vacuous
    assert float(ref[-1]["rate_al.penalty"]) > 2.0 or float(ref[-1]["rate_al.multiplier"]) > 0

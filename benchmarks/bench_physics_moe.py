"""Training-step time of physics hard constraints vs the number of collocation points: K = 1 vs K experts.

Chalapathi, Du & Krishnapriyan (ICLR 2024, Fig. 4/5) report that the training time of a single hard
constraint (PI-HC) grows roughly quadratically with the number of sampled points ``m`` while the
mixture (PI-HC-MoE, ``K`` experts with ``m/K`` points each) stays nearly flat: 1.6× faster at
``10²`` points up to 3.2× at ``10⁵`` (diffusion–sorption, A100s, devices in parallel).

Here: diffusion–sorption on a 256 × 64 grid (:class:`optlayers.solvers.pde.DiffusionSorption`), a
batch of 4 initial conditions, an MLP ``(x, t, u₀, a) → 16`` basis functions (width 32), and one
full training step — network forward, the constraint solve (batched Levenberg–Marquardt in
float64 over samples × experts), the physics loss, the implicit backward and an Adam update —
for ``K = 1`` (:class:`~optlayers.layers.physics.HardConstraintLayer`) and ``K = 2, 4, 8``
spatial experts (:class:`~optlayers.layers.physics.PhysicsConstrainedMoE`, global
initial/boundary rows as in the paper) at ``m = 10², 10³, 10⁴`` total points (``--full``: also
``3·10²``, ``3·10³`` and ``1.5·10⁴``, the most the 8-expert tiles hold on this grid). Columns:
``median_s`` — median step time (of 3 steps; 5–7 with ``--full``); ``ratio`` — ``K``-expert time
/ single-constraint time at the same ``m`` (below 1: the mixture is faster); ``accuracy`` — the
worst inner stationarity ``‖Jᵀr‖/‖Jᵀr₀‖`` over all problems; ``iterations`` — mean LM
iterations; ``solve_s`` — the constraint layer's forward alone; ``exponent`` (last ``m`` of each
``K``) — the slope of ``log time`` vs ``log m`` over the whole sweep (1: linear, 2: quadratic).
Each configuration runs in a fresh subprocess (peak memory: growth of its peak resident set),
one intra-op thread (``OPTLAYERS_BENCH_THREADS``), after a warm-up step.

The structured solve costs ``O(m N²)`` per LM iteration whatever ``K`` (the experts split the
rows, not the work), so on one CPU the mixture can only win through fewer or less variable LM
iterations (a batched solve runs until its slowest problem stops); the paper's device parallelism
does not exist on a 2-core CPU. Run ``python benchmarks/bench_physics_moe.py [--full]`` or
``python -m optlayers bench physics_moe``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from optlayers.bench import format_table, isolated
from optlayers.layers.physics import HardConstraintLayer, PhysicsConstrainedMoE, TileRouter
from optlayers.solvers.pde import DiffusionSorption, sample_coefficients

HERE = os.path.abspath(__file__)
THREADS = int(os.environ.get("OPTLAYERS_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
NX, NT, N_BASIS, SAMPLES, WIDTH = 256, 64, 16, 4, 32


def case_step(experts: int, n_points: int) -> Any:
    """Set up one configuration; returns the measured training step."""
    torch.manual_seed(0)
    pde = DiffusionSorption()
    grid = pde.grid(NX, NT)
    net = nn.Sequential(nn.Linear(7, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, N_BASIS))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    if experts == 1:
        layer: nn.Module = HardConstraintLayer(pde, grid, n_points=n_points, throw=False)
    else:
        layer = PhysicsConstrainedMoE(pde, grid, TileRouter((experts, 1)), n_points=n_points, throw=False)
    a = sample_coefficients(SAMPLES, generator=torch.Generator().manual_seed(1))
    x, _ = grid.coords()
    u0 = pde.initial_condition(a, x)
    X, T = grid.mesh(torch.float32)
    feats = torch.cat([torch.stack([X, T / grid.t_max], -1).expand(SAMPLES, -1, -1, -1),
                       u0.float()[:, :, None, None].expand(-1, -1, NT, 1),
                       a.float()[:, None, None, :].expand(-1, NX, NT, -1)], -1)
    gen = torch.Generator().manual_seed(2)

    def step() -> dict[str, Any]:
        opt.zero_grad()
        basis = net(feats)
        t0 = time.perf_counter()
        res = layer.solve(basis, u0, generator=gen)
        solve_s = time.perf_counter() - t0
        layer.physics_loss(res, u0).backward()
        opt.step()
        return {"accuracy": float(res.aux.stationarity.max()), "iterations": float(res.iterations.double().mean()),
                "max_iterations": int(res.iterations.max()), "converged": bool(res.converged.all()),
                "solve_s": solve_s}

    return step


CASES = {"step": case_step}


def run(full: bool = False) -> list[dict[str, Any]]:
    """Every configuration in its own subprocess; returns the table rows."""
    ms = (100, 300, 1000, 3000, 10_000, 15_000) if full else (100, 1000, 10_000)
    ks = (1, 2, 4, 8)
    rows: list[dict[str, Any]] = []
    times: dict[tuple[int, int], float] = {}
    for m in ms:
        for k in ks:
            repeats = (7 if m <= 1000 else 5) if full else 3
            res = isolated(HERE, "step", repeats=repeats, experts=k, n_points=m)
            times[(k, m)] = res["median_s"]
            rows.append({"problem": f"diffusion_sorption {NX}x{NT}, m={m}", "library": f"optlayers K={k}",
                         "median_s": res["median_s"], "ratio": res["median_s"] / times[(1, m)],
                         "peak_mem_mb": res["peak_mem_mb"], "accuracy": res["accuracy"],
                         "iterations": res["iterations"], "solve_s": res["solve_s"],
                         "converged": res["converged"]})
    for k in ks:  # growth exponent of the step time over the sweep
        slope = math.log(times[(k, ms[-1])] / times[(k, ms[0])]) / math.log(ms[-1] / ms[0])
        for r in rows:
            if r["library"] == f"optlayers K={k}" and r["problem"].endswith(f"m={ms[-1]}"):
                r["exponent"] = slope
    return rows


if __name__ == "__main__":
    table = run(full="--full" in sys.argv)
    print(format_table(table))
    for k in (1, 2, 4, 8):
        ex = [r for r in table if r["library"] == f"optlayers K={k}" and "exponent" in r]
        if ex:
            print(f"K={k}: step time ~ m^{ex[0]['exponent']:.2f} over the sweep")

"""Demo stage: an optimal-transport loss fits a point cloud; sparse OT plans with k nonzeros a column.

Part 1 moves 2-D points (a Gaussian blob) onto a target shape (a ring with a bar) by gradient
descent on the debiased Sinkhorn divergence :class:`optlayers.layers.SinkhornLoss` (every ε
stage converged; envelope gradients). Part 2 transports a subsample of the fitted points to the
target with :func:`optlayers.solvers.sparse_ot.sparse_ot` — quadratically regularized OT with
at most ``k`` nonzeros in each column — for k = 1 and 2, next to the unconstrained quadratic plan
and the dense entropic (Sinkhorn) plan. Checked: the divergence falls to at most 1% of its start;
every k-sparse plan has at most k nonzeros per column; the Sinkhorn and quadratic plans meet their
marginals (L1 error ≤ 1e-3 and 1e-6).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import StageResult, progress


def _target(n: int, gen: torch.Generator) -> torch.Tensor:
    k = int(0.7 * n)
    t = 2 * math.pi * torch.rand(k, generator=gen)
    ring = torch.stack([torch.cos(t), torch.sin(t)], -1)
    bar = torch.stack([torch.rand(n - k, generator=gen) * 1.6 - 0.8, torch.zeros(n - k)], -1)
    return torch.cat([ring, bar]) + 0.03 * torch.randn(n, 2, generator=gen)


def run(quick: bool, out: Path) -> StageResult:
    from ..layers.ot import SinkhornLoss
    from ..solvers.ot import PointCloud, SqEuclidean, sinkhorn
    from ..solvers.sparse_ot import quadratic_ot, sparse_ot

    n, steps, n_plan = (80, 20, 12) if quick else (200, 35, 20)
    gen = torch.Generator().manual_seed(0)
    y = _target(n, gen)
    x0 = 0.3 * torch.randn(n, 2, generator=gen) + torch.tensor([1.5, 1.5])
    x = x0.clone().requires_grad_()
    loss_fn = SinkhornLoss(p=2, blur=0.05, scaling=0.5)
    history = []
    for _ in progress(range(steps), desc="Sinkhorn-divergence descent"):
        loss = loss_fn(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x -= n * grad  # a loss over 1/n-weighted points has gradients of size 1/n
        history.append(float(loss.detach()))
    history.append(float(loss_fn(x.detach(), y)))
    xf = x.detach()

    # plans between a subsample of the fitted points and of the target, in float64
    idx = torch.randperm(n, generator=gen)[:n_plan]
    xs, ys = xf[idx].double(), y[torch.randperm(n, generator=gen)[:n_plan]].double()
    C = torch.cdist(xs, ys) ** 2
    C = C / C.max()
    gamma = 10.0 / n_plan
    plans: dict[str, torch.Tensor] = {}
    rows = []
    ent = sinkhorn(None, None, PointCloud(xs, ys, SqEuclidean(1.0)),
                   epsilon=0.02 * float((torch.cdist(xs, ys) ** 2).max()), tol=1e-9)
    P = ent.aux.plan.to_dense()
    sink_err = float((P.sum(1) - 1 / n_plan).abs().sum() + (P.sum(0) - 1 / n_plan).abs().sum())
    plans["Sinkhorn (entropic)"] = P
    rows.append(("Sinkhorn (entropic)", float((P * C).sum()), int((P > 1e-12).sum(0).max()), sink_err))
    nnz_ok = True
    quad_err = float("nan")
    for k in progress([None, 2, 1], desc="sparse OT plans"):
        res = (quadratic_ot(None, None, C, gamma=gamma) if k is None
               else sparse_ot(None, None, C, k=k, gamma=gamma, throw=False))
        name = "quadratic (k = ∞)" if k is None else f"sparse, k = {k}"
        P = res.aux.plan.to_dense()
        plans[name] = P
        nnz = int(res.aux.max_nnz)
        err = float(res.aux.marginal_violation)
        if k is None:
            quad_err = err
        else:
            nnz_ok = nnz_ok and nnz <= k and int((P > 0).sum(0).max()) <= k
        rows.append((name, float(res.aux.transport_cost), nnz, err))
    fell = history[-1] <= 0.01 * history[0]  # may end a hair below 0: the solves stop at tolerance 1e-3
    passed = fell and nnz_ok and sink_err <= 1e-3 and quad_err <= 1e-6
    table = "\n".join(
        [f"Sinkhorn divergence {history[0]:.4f} -> {history[-1]:.2e} in {steps} steps ({n} points)",
         f"{f'plan ({n_plan} x {n_plan})':<22}{'<C, P>':>9}{'max nnz/column':>16}{'marginal L1 err':>17}"]
        + [f"{r[0]:<22}{r[1]:>9.4f}{r[2]:>16d}{r[3]:>17.1e}" for r in rows])
    print(table)
    figures = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(12, 3.8))
        ax[0].scatter(*y.T, s=6, c="C1", label="target")
        ax[0].scatter(*x0.T, s=6, c="C0", label="start")
        ax[0].set_title(f"start (divergence {history[0]:.3f})")
        ax[0].legend(fontsize=8, loc="lower left")
        ax[1].scatter(*y.T, s=30, facecolors="none", edgecolors="C1", lw=0.8, label="target")
        ax[1].scatter(*xf.T, s=6, c="C0", label="fitted points")
        ax[1].legend(fontsize=8, loc="lower left")
        ax[1].set_title(f"after {steps} steps (divergence {history[-1]:.1e})")
        for a in ax[:2]:
            a.set_aspect("equal")
        ax[2].plot(history, marker="o", ms=3)
        ax[2].set_yscale("symlog", linthresh=1e-6)  # the converged divergence may be a hair below 0
        ax[2].set(xlabel="step", ylabel="Sinkhorn divergence", title="SinkhornLoss during the fit")
        fig.tight_layout()
        fig.savefig(out / "ot_fit.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(1, len(plans), figsize=(3.2 * len(plans), 3.4))
        for a, (name, P) in zip(ax, plans.items(), strict=True):
            a.imshow(P.numpy(), cmap="magma_r", interpolation="nearest")
            a.set_title(f"{name}\nmax {int((P > 1e-12).sum(0).max())} nonzeros/column", fontsize=9)
            a.set(xlabel="target j", ylabel="source i")
        fig.tight_layout()
        fig.savefig(out / "ot_plans.png", dpi=110)
        plt.close(fig)
        figures += ["ot_fit.png", "ot_plans.png"]
    except ImportError:
        pass
    return StageResult(
        name="ot",
        solved=f"fit {n} points to a shape with SinkhornLoss; k-sparse OT plans (sparse_ot, k = 1, 2)",
        result=(f"divergence {history[0]:.3f} -> {history[-1]:.1e}; max nonzeros/column: "
                + ", ".join(f"{r[2]} (k = {r[0][-1]})" for r in rows[2:])
                + f", {rows[1][2]} (quadratic), {rows[0][2]} (Sinkhorn)"),
        check=(f"divergence <= 1% of start; nnz/column <= k; marginal err Sinkhorn {sink_err:.0e} <= 1e-3,"
               f" quadratic {quad_err:.0e} <= 1e-6"),
        passed=passed, figures=figures, table=table)

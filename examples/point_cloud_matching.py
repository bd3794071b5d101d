"""Fit a point cloud to a target shape by gradient descent on the Sinkhorn divergence.

The source starts as a Gaussian blob; the target is a noisy ring with a bar across it. Each step
evaluates ``SinkhornLoss`` (debiased, every annealing stage converged) and moves the points
along the envelope gradient. The figure shows the start, the end and the matching (the
barycentric map of the final transport plan).

    python examples/point_cloud_matching.py            # about a minute
    python examples/point_cloud_matching.py --quick    # a few seconds (used by the tests)
    python examples/point_cloud_matching.py --out DIR  # where the figure goes
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from optlayers.layers.ot import SinkhornLoss
from optlayers.solvers.ot import PointCloud, SqEuclidean, sinkhorn


def target_shape(n: int, generator: torch.Generator) -> torch.Tensor:
    k = int(n * 0.7)
    t = 2 * math.pi * torch.rand(k, generator=generator)
    ring = torch.stack([torch.cos(t), torch.sin(t)], -1)
    bar = torch.stack([torch.rand(n - k, generator=generator) * 1.6 - 0.8, torch.zeros(n - k)], -1)
    pts = torch.cat([ring, bar]) + 0.03 * torch.randn(n, 2, generator=generator)
    return pts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (a few seconds)")
    parser.add_argument("--out", type=Path, default=Path("."), help="output directory for the figure")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)

    n, steps = (100, 15) if args.quick else (600, 150)
    if args.steps is not None:
        steps = args.steps
    gen = torch.Generator().manual_seed(0)
    y = target_shape(n, gen)
    x0 = 0.3 * torch.randn(n, 2, generator=gen) + torch.tensor([1.5, 1.5])
    x = x0.clone().requires_grad_()
    loss_fn = SinkhornLoss(p=2, blur=0.05, scaling=0.5)
    history = []
    try:
        from tqdm import tqdm

        it = tqdm(range(steps), desc="sinkhorn matching", disable=args.quick, file=sys.stderr)
    except ImportError:  # pragma: no cover
        it = range(steps)
    lr = 1.0
    for _ in it:
        loss = loss_fn(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x -= lr * n * grad  # the gradient of a loss over 1/n-weighted points scales as 1/n
        history.append(float(loss.detach()))
    final = loss_fn(x.detach(), y)

    # matching: barycentric projection of the final plan
    res = sinkhorn(None, None, PointCloud(x.detach(), y, SqEuclidean(0.5)), epsilon=0.05 ** 2, throw=False)
    match = res.aux.plan.matvec(y) * n

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    axes[0].scatter(*y.T, s=6, c="tab:orange", label="target")
    axes[0].scatter(*x0.T, s=6, c="tab:blue", label="start")
    axes[0].set_title(f"start (S = {history[0]:.3f})")
    axes[1].scatter(*y.T, s=6, c="tab:orange")
    axes[1].scatter(*x.detach().T, s=6, c="tab:blue")
    axes[1].set_title(f"end after {steps} steps (S = {float(final):.2e})")
    xd = x.detach()
    for i in range(0, n, max(1, n // 150)):
        axes[2].plot([xd[i, 0], match[i, 0]], [xd[i, 1], match[i, 1]], c="gray", lw=0.5)
    axes[2].scatter(*y.T, s=6, c="tab:orange")
    axes[2].scatter(*xd.T, s=6, c="tab:blue")
    axes[2].set_title("matching (barycentric map of the plan)")
    for ax in axes:
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "point_cloud_matching.png"
    fig.savefig(path, dpi=110)
    sys.stdout.write(f"loss {history[0]:.4f} -> {float(final):.2e}; figure: {path}\n")
    return 0 if float(final) < history[0] else 1


if __name__ == "__main__":
    sys.exit(main())

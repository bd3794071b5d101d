"""Demo stage: per-feature L2 penalties of logistic regression tuned by hypergradient descent.

Data: scikit-learn's bundled breast-cancer set (569 samples, 30 features). The inner problem is
solved by :func:`optlayers.implicit.minimize` (L-BFGS); the gradient of the validation loss with
respect to all 30 log-penalties comes from the implicit function theorem in one backward pass.
Compared with a grid search over a single shared penalty.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..implicit import LBFGS, minimize
from . import StageResult, progress

DT = torch.float64


def load_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Standardized breast-cancer data split 40/30/30 into train/validation/test."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=DT)
    y = torch.tensor(y, dtype=DT)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n1, n2 = int(0.4 * len(y)), int(0.7 * len(y))
    mu, sd = X[:n1].mean(0), X[:n1].std(0)
    X = (X - mu) / sd
    X = torch.cat([X, torch.ones(len(y), 1, dtype=DT)], 1)  # bias column (not penalized)
    return X[:n1], y[:n1], X[n1:n2], y[n1:n2], X[n2:], y[n2:]


def logistic(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)


def make_inner(Xtr: torch.Tensor, ytr: torch.Tensor):
    def inner(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return logistic(w, Xtr, ytr) + 0.5 * (torch.exp(log_lam) * w[:-1] ** 2).sum() / len(ytr)

    return inner


def run(quick: bool, out: Path) -> StageResult:
    Xtr, ytr, Xva, yva, Xte, yte = load_data()
    d = Xtr.shape[1]
    inner = make_inner(Xtr, ytr)
    # an absolute gradient tolerance: the outer loop warm-starts each inner solve at the previous
    # solution, where the default relative test (rtol · ‖∇f(z0)‖, a tiny initial gradient) would
    # ask for a gradient norm near 1e-12 that L-BFGS cannot reach on this ill-conditioned problem
    solver = LBFGS(atol=1e-9)
    # The finite-difference check needs inner solves far below its step (the problem is
    # ill-conditioned: nearly separable data, tiny penalties).
    tight_solver = LBFGS(rtol=1e-15, atol=1e-15, max_iter=3000)

    def val_loss(log_lam: torch.Tensor, w0: torch.Tensor, tight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        res = minimize(inner, w0, log_lam, solver=tight_solver if tight else solver)
        return logistic(res.solution, Xva, yva), res.solution.detach()

    # grid search over one shared penalty
    grid = torch.linspace(-4, 6, 6 if quick else 9, dtype=DT)
    grid_losses = []
    w0 = torch.zeros(d, dtype=DT)
    for g in progress(grid, desc="grid search"):
        loss, _ = val_loss(torch.full((d - 1,), float(g), dtype=DT), w0)
        grid_losses.append(float(loss.detach()))
    best = int(torch.tensor(grid_losses).argmin())
    # hypergradient descent on all per-feature log-penalties, from the best grid point
    log_lam = torch.full((d - 1,), float(grid[best]), dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([log_lam], lr=0.2)
    history = []
    w = w0
    steps = 12 if quick else 25
    for _ in progress(range(steps), desc="hypergradient steps"):
        loss, w = val_loss(log_lam, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    final, w = val_loss(log_lam.detach(), w)
    history.append(float(final))
    # check the hypergradient against a central finite difference on one coordinate
    lam0 = log_lam.detach().clone().requires_grad_()
    g_impl = torch.autograd.grad(val_loss(lam0, w, tight=True)[0], lam0)[0]
    h, j = 1e-4, int(g_impl.abs().argmax())
    e = torch.zeros_like(lam0)
    e[j] = h
    fd = (float(val_loss(lam0.detach() + e, w, True)[0]) - float(val_loss(lam0.detach() - e, w, True)[0])) / (2 * h)
    fd_err = abs(float(g_impl[j]) - fd) / max(abs(fd), 1e-12)
    acc = lambda ww: float(((Xte @ ww > 0).to(DT) == yte).to(DT).mean())  # noqa: E731
    w_grid = val_loss(torch.full((d - 1,), float(grid[best]), dtype=DT), w0)[1]
    passed = history[-1] <= grid_losses[best] + 1e-9 and fd_err < 1e-6
    table = "\n".join([
        f"{'method':<28}{'val loss':>10}{'test acc':>10}",
        f"{'grid search (1 penalty)':<28}{grid_losses[best]:>10.4f}{acc(w_grid):>10.3f}",
        f"{'hypergradient (30 penalties)':<28}{history[-1]:>10.4f}{acc(w):>10.3f}",
    ])
    print(table)
    figures = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(history, marker="o", ms=3, label="hypergradient descent (30 penalties)")
        ax.axhline(grid_losses[best], color="C3", ls="--", label="best grid point (1 penalty)")
        ax.set_xlabel("outer step")
        ax.set_ylabel("validation loss")
        ax.set_title("Breast cancer: validation loss vs outer steps")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "hypergradients.png", dpi=120)
        plt.close(fig)
        figures.append("hypergradients.png")
    except ImportError:
        pass
    return StageResult(
        name="hypergradients",
        solved="per-feature L2 of logistic regression on breast cancer (implicit hypergradients)",
        result=f"val loss {grid_losses[best]:.4f} (grid) -> {history[-1]:.4f}",
        check=f"val loss <= best grid; hypergradient vs finite difference rel. err {fd_err:.1e} < 1e-6",
        passed=passed, figures=figures, table=table)

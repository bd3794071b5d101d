"""Demo stage: a Markowitz portfolio written in CVXPY, made a layer, and trained end to end.

Each period, 12 assets carry 6 features each; a shared linear model scores them, ``μ̂ = θᵀφ + c``,
and a :class:`optlayers.layers.CvxpyLayer` built from the CVXPY problem

    w*(μ̂) = argmax_w  μ̂ᵀw − (γ/2)‖Lᵀw‖²   s.t.  1ᵀw = 1,  0 ≤ w ≤ 0.25      (Σ = LLᵀ)

chooses the portfolio (one batched interior-point solve per minibatch, gradients from the KKT
conditions). The true returns contain a large *market move* common to all assets: it does not
change the best portfolio, but it dominates the squared error, so a least-squares fit of ``μ̂``
(two-stage) ranks the assets worse than training ``θ`` on the realized utility of the decision
itself (end to end). Checked: the layer's forward equals CVXPY's own solution, and end-to-end
training beats the two-stage model on held-out periods.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import StageResult, progress

DT = torch.float64
N_ASSETS, N_FEATURES, GAMMA, W_MAX, MARKET = 12, 6, 2.0, 0.25, 0.1


def _market(gen: torch.Generator) -> dict[str, torch.Tensor]:
    F = 0.1 * torch.randn(N_ASSETS, 3, generator=gen, dtype=DT)
    sigma = F @ F.T + torch.diag(0.03 + 0.03 * torch.rand(N_ASSETS, generator=gen, dtype=DT)) ** 2
    beta = torch.randn(N_FEATURES, generator=gen, dtype=DT)
    beta = beta / beta.norm()
    gam = torch.randn(N_FEATURES, generator=gen, dtype=DT)
    gam = gam - (gam @ beta) * beta
    return {"sigma": sigma, "beta": beta, "gamma": gam / gam.norm()}


def _sample(mk: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Features ``(n, assets, features)``, expected and realized returns ``(n, assets)``."""
    phi = torch.randn(n, N_ASSETS, N_FEATURES, generator=gen, dtype=DT)
    move = MARKET * (phi @ mk["gamma"]).mean(-1, keepdim=True) * N_ASSETS ** 0.5
    mu = 0.02 * (phi @ mk["beta"]) + move
    r = mu + torch.randn(n, N_ASSETS, generator=gen, dtype=DT) @ torch.linalg.cholesky(mk["sigma"]).T
    return phi, mu, r


def _utility(w: torch.Tensor, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (w * r).sum(-1) - 0.5 * GAMMA * ((w @ sigma) * w).sum(-1)


def run(quick: bool, out: Path) -> StageResult:
    import cvxpy as cp

    from ..layers.qp import CvxpyLayer

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mk = _market(gen)
    sigma = mk["sigma"]
    n_train, n_test = (600, 400) if quick else (3000, 1500)
    steps, batch, lr = (25, 64, 5e-3) if quick else (60, 128, 3e-3)
    phi, _, r = _sample(mk, n_train, gen)
    phi_te, mu_te, r_te = _sample(mk, n_test, gen)

    # the optimization problem, written once in CVXPY
    w = cp.Variable(N_ASSETS)
    mu_hat = cp.Parameter(N_ASSETS)
    L = torch.linalg.cholesky(sigma).numpy()
    problem = cp.Problem(cp.Maximize(mu_hat @ w - 0.5 * GAMMA * cp.sum_squares(L.T @ w)),
                         [cp.sum(w) == 1, w >= 0, w <= W_MAX])
    layer = CvxpyLayer(problem, parameters=[mu_hat], variables=[w])

    # two-stage: least squares on realized returns (closed form)
    X1 = torch.cat([phi.reshape(-1, N_FEATURES), torch.ones(n_train * N_ASSETS, 1, dtype=DT)], 1)
    coef = torch.linalg.lstsq(X1, r.reshape(-1, 1)).solution[:, 0]
    model = torch.nn.Linear(N_FEATURES, 1, dtype=DT)
    with torch.no_grad():
        model.weight.copy_(coef[:-1][None])
        model.bias.copy_(coef[-1:])

    def test_utility() -> float:
        with torch.no_grad():
            (wt,) = layer(model(phi_te).squeeze(-1))
            return float(_utility(wt, r_te, sigma).mean())

    # forward check against CVXPY's own solver on a few held-out periods
    with torch.no_grad():
        mus = model(phi_te[:5]).squeeze(-1)
        (w_layer,) = layer(mus)
    fwd_err = 0.0
    for i in range(len(mus)):
        mu_hat.value = mus[i].numpy()
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        fwd_err = max(fwd_err, float((w_layer[i] - torch.from_numpy(w.value)).abs().max()))

    # end to end: from the two-stage fit, maximize realized utility through the layer
    u_two_stage = test_utility()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = [(0, u_two_stage)]
    every = max(1, steps // 8)
    for step in progress(range(1, steps + 1), desc="end-to-end training through the QP"):
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        (wb,) = layer(model(phi[idx]).squeeze(-1))
        loss = -_utility(wb, r[idx], sigma).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append((step, test_utility()))
    u_e2e = curve[-1][1]
    with torch.no_grad():
        (w_oracle,) = layer(mu_te)
        u_oracle = float(_utility(w_oracle, r_te, sigma).mean())
    u_equal = float(_utility(torch.full_like(r_te, 1 / N_ASSETS), r_te, sigma).mean())
    passed = fwd_err < 1e-6 and u_e2e > u_two_stage
    rows = [("equal weights", u_equal), ("two-stage (least squares)", u_two_stage),
            ("end to end (CvxpyLayer)", u_e2e), ("oracle (true expected returns)", u_oracle)]
    table = "\n".join([f"{'portfolio rule':<32}{'test utility':>13}"] + [f"{n:<32}{u:>13.5f}" for n, u in rows]
                      + [f"forward vs CVXPY (Clarabel): max |w_layer - w_cvxpy| = {fwd_err:.1e}"])
    print(table)
    figures = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        s, v = zip(*curve, strict=True)
        ax[0].plot(s, v, marker="o", ms=3, label="end to end (CvxpyLayer)")
        ax[0].axhline(u_two_stage, color="C1", ls="--", label="two-stage (least squares)")
        ax[0].axhline(u_oracle, color="k", ls=":", label="oracle (true μ)")
        ax[0].set(xlabel="training step", ylabel="mean realized utility (test)",
                  title="Training through the portfolio QP")
        ax[0].legend(fontsize=8)
        ax[1].bar(range(len(rows)), [u for _, u in rows], color=["C7", "C1", "C0", "k"])
        ax[1].set_xticks(range(len(rows)), ["equal", "two-stage", "end to end", "oracle"])
        ax[1].set(ylabel="mean realized utility (test)", title=f"Decision quality, {n_test} held-out periods")
        fig.tight_layout()
        fig.savefig(out / "qp.png", dpi=110)
        plt.close(fig)
        figures.append("qp.png")
    except ImportError:
        pass
    return StageResult(
        name="qp",
        solved=f"Markowitz portfolio ({N_ASSETS} assets) as a CvxpyLayer, trained end to end on realized utility",
        result=f"test utility {u_two_stage:.4f} (two-stage) -> {u_e2e:.4f} (oracle {u_oracle:.4f})",
        check=f"forward = CVXPY (max err {fwd_err:.0e} < 1e-6); end to end beats two-stage",
        passed=passed, figures=figures, table=table)

"""Decision-focused learning: a mean-variance portfolio QP layer trained end to end.

Each period, 12 assets are described by 6 features each, and a shared linear model scores them,
``μ̂_k = θᵀφ_k + c``; a portfolio is then chosen by the Markowitz QP (a
:class:`optlayers.layers.QPLayer`)

    w*(μ̂) = argmax_w  μ̂ᵀw − (γ/2) wᵀΣw   s.t.  1ᵀw = 1,  0 ≤ w ≤ 0.25,

and judged by its *realized* utility ``rᵀw* − (γ/2) w*ᵀΣw*``. The true expected returns are
``μ_k = 0.02 βᵀφ_k + m``, where the *market move* ``m`` (large, driven by a feature direction
γ ⊥ β averaged over all assets) is common to every asset. A common move does not change the best
portfolio (the weights sum to one), but it dominates the squared error. So two ways of training
the same model differ:

* **two-stage** — fit ``μ̂`` to the realized returns by least squares (closed form), then optimize:
  least squares tilts ``θ`` towards γ to explain the market move, and ranks the assets badly;
* **end to end** — start from the two-stage model and maximize the realized utility of the QP's
  decision directly, with gradients through the QP's KKT conditions (implicit differentiation,
  one batched interior-point solve per minibatch): ``θ`` turns towards β.

The script prints a table (test utility with realized and with expected returns, gap to the
oracle that knows ``μ``, return MSE, cosine between ``θ`` and β) and saves ``portfolio_qp.png``
(training curve, test utilities, average allocations) and ``portfolio_qp.json`` in ``--out``.

Run: ``python examples/portfolio_qp.py [--quick] [--out DIR] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from optlayers.layers.qp import QPLayer

N_ASSETS, N_FEATURES = 12, 6
GAMMA, W_MAX = 2.0, 0.25
MARKET = 0.1  # standard deviation of the common market move
DT = torch.float64


def make_market(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Factor-model covariance, the asset-specific direction β and the market direction γ ⊥ β."""
    F = 0.1 * torch.randn(N_ASSETS, 3, generator=gen, dtype=DT)
    sigma = F @ F.T + torch.diag(0.03 + 0.03 * torch.rand(N_ASSETS, generator=gen, dtype=DT)) ** 2
    beta = torch.randn(N_FEATURES, generator=gen, dtype=DT)
    beta = beta / beta.norm()
    gam = torch.randn(N_FEATURES, generator=gen, dtype=DT)
    gam = gam - (gam @ beta) * beta
    return {"sigma": sigma, "beta": beta, "gamma": gam / gam.norm()}


def true_mu(market: dict[str, torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
    """Asset-specific signal plus a market move common to all assets."""
    move = MARKET * (phi @ market["gamma"]).mean(-1, keepdim=True) * N_ASSETS ** 0.5
    return 0.02 * (phi @ market["beta"]) + move


def sample(market: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Features ``(n, assets, features)``, expected and realized returns ``(n, assets)``."""
    phi = torch.randn(n, N_ASSETS, N_FEATURES, generator=gen, dtype=DT)
    mu = true_mu(market, phi)
    L = torch.linalg.cholesky(market["sigma"])
    r = mu + torch.randn(n, N_ASSETS, generator=gen, dtype=DT) @ L.T
    return phi, mu, r


class Allocator(torch.nn.Module):
    """Shared linear scoring of the assets followed by the Markowitz QP layer."""

    def __init__(self, sigma: torch.Tensor) -> None:
        super().__init__()
        self.model = torch.nn.Linear(N_FEATURES, 1, dtype=DT)
        self.qp = QPLayer()
        n = N_ASSETS
        self.register_buffer("Q", GAMMA * sigma)
        self.register_buffer("G", torch.cat([-torch.eye(n, dtype=DT), torch.eye(n, dtype=DT)]))
        self.register_buffer("h", torch.cat([torch.zeros(n, dtype=DT), torch.full((n,), W_MAX, dtype=DT)]))
        self.register_buffer("A", torch.ones(1, n, dtype=DT))
        self.register_buffer("b", torch.ones(1, dtype=DT))

    def decide(self, mu_hat: torch.Tensor) -> torch.Tensor:
        # shared Q, G, h, A, b; a batch of predicted returns: one batched solve
        return self.qp(self.Q, -mu_hat, self.G, self.h, self.A, self.b)

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_hat = self.model(phi).squeeze(-1)
        return mu_hat, self.decide(mu_hat)


def utility(w: torch.Tensor, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Realized mean-variance utility per period."""
    return (w * r).sum(-1) - 0.5 * GAMMA * ((w @ sigma) * w).sum(-1)


def evaluate(net: Allocator, data: tuple[torch.Tensor, ...], market: dict[str, torch.Tensor]) -> dict[str, float]:
    x, mu, r = data
    sigma = market["sigma"]
    with torch.no_grad():
        mu_hat, w = net(x)
        theta = net.model.weight[0] / net.model.weight[0].norm()
        return {"utility": float(utility(w, r, sigma).mean()),
                "expected_utility": float(utility(w, mu, sigma).mean()),
                "mse": float(((mu_hat - r) ** 2).mean()),
                "cos_beta": float(theta @ market["beta"]),
                "theta_direction": [float(theta @ market["beta"]), float(theta @ market["gamma"])],
                "weights": w.mean(0).tolist()}


def run(quick: bool = False, out: str | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Train both models and return the test metrics (also printed, plotted and saved)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    market = make_market(gen)
    sigma = market["sigma"]
    n_train, n_test = (600, 400) if quick else (4000, 2000)
    steps, batch, lr = (30, 64, 5e-3) if quick else (300, 128, 2e-3)
    train, test = sample(market, n_train, gen), sample(market, n_test, gen)
    phi_tr, _, r_tr = train
    t0 = time.perf_counter()

    # two-stage: least squares on realized returns (closed form), then optimize
    two_stage = Allocator(sigma)
    X1 = torch.cat([phi_tr.reshape(-1, N_FEATURES), torch.ones(n_train * N_ASSETS, 1, dtype=DT)], 1)
    coef = torch.linalg.lstsq(X1, r_tr.reshape(-1, 1)).solution
    with torch.no_grad():
        two_stage.model.weight.copy_(coef[:-1].T)
        two_stage.model.bias.copy_(coef[-1])

    # end to end: start from the two-stage fit, maximize realized utility through the QP layer
    e2e = Allocator(sigma)
    e2e.load_state_dict(two_stage.state_dict())
    opt = torch.optim.Adam(e2e.model.parameters(), lr=lr)
    curve = [(0, evaluate(e2e, test, market)["utility"])]
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        _, w = e2e(phi_tr[idx])
        loss = -utility(w, r_tr[idx], sigma).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 6) == 0 or step == steps:
            curve.append((step, evaluate(e2e, test, market)["utility"]))

    oracle_w = two_stage.decide(test[1]).detach()
    equal_w = torch.full_like(test[2], 1 / N_ASSETS)
    summary = {
        "two-stage (least squares)": evaluate(two_stage, test, market),
        "end to end (QP layer)": evaluate(e2e, test, market),
        "oracle (true mu)": {"utility": float(utility(oracle_w, test[2], sigma).mean()),
                             "expected_utility": float(utility(oracle_w, test[1], sigma).mean()),
                             "mse": float(((test[1] - test[2]) ** 2).mean()), "cos_beta": 1.0,
                             "weights": oracle_w.mean(0).tolist()},
        "equal weight": {"utility": float(utility(equal_w, test[2], sigma).mean()),
                         "expected_utility": float(utility(equal_w, test[1], sigma).mean()),
                         "mse": float("nan"), "cos_beta": float("nan"), "weights": [1 / N_ASSETS] * N_ASSETS},
    }
    elapsed = time.perf_counter() - t0
    best = summary["oracle (true mu)"]["expected_utility"]
    print(f"Markowitz QP layer, {N_ASSETS} assets, {n_train} training / {n_test} test periods, "
          f"{steps} end-to-end steps of batch {batch} ({elapsed:.1f} s)")
    print(f"{'method':28s} {'test utility':>13s} {'expected':>10s} {'gap to oracle':>14s} {'return MSE':>11s} "
          f"{'cos(θ, β)':>10s}")
    for name, s in summary.items():
        print(f"{name:28s} {s['utility']:13.5f} {s['expected_utility']:10.5f} "
              f"{best - s['expected_utility']:14.5f} {s['mse']:11.5f} {s['cos_beta']:10.2f}")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "portfolio_qp.json"), "w") as fh:
            json.dump({"summary": summary, "curve": curve, "quick": quick, "seed": seed}, fh, indent=2)
        _plot(summary, curve, os.path.join(out, "portfolio_qp.png"))
    return summary


def _plot(summary: dict[str, dict[str, float]], curve: list[tuple[int, float]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the table and JSON are always written
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    steps, vals = zip(*curve, strict=True)
    ax[0].plot(steps, vals, marker="o", label="end to end")
    ax[0].axhline(summary["two-stage (least squares)"]["utility"], color="C1", ls="--", label="two-stage")
    ax[0].axhline(summary["oracle (true mu)"]["utility"], color="k", ls=":", label="oracle")
    ax[0].set(xlabel="training step", ylabel="test utility", title="End-to-end training through the QP")
    ax[0].legend()
    names = list(summary)
    colors = {"two-stage (least squares)": "C1", "end to end (QP layer)": "C0", "oracle (true mu)": "k",
              "equal weight": "C7"}
    ax[1].bar(range(len(names)), [summary[n]["utility"] for n in names], color=[colors[n] for n in names])
    ax[1].set_xticks(range(len(names)), [n.split(" (")[0] for n in names])
    ax[1].set(ylabel="mean realized utility (test)", title="Decision quality")
    width = 0.35
    for k, n in enumerate(names[:2]):
        th = summary[n]["theta_direction"]
        ax[2].bar([i + (k - 0.5) * width for i in range(2)], th, width, color=colors[n], label=n.split(" (")[0])
    ax[2].set_xticks(range(2), ["β (asset-specific signal)", "γ (market move)"])
    ax[2].set(ylabel="component of θ / ‖θ‖", title="What the linear model learned")
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (under 30 s), as in the tests")
    parser.add_argument("--out", default="portfolio_qp_out", help="folder for the plot and the JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small batched solves: one BLAS thread is fastest
    run(quick=args.quick, out=args.out, seed=args.seed)


if __name__ == "__main__":
    main()

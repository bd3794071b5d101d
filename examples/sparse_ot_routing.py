"""Sparsity-constrained optimal transport: plans for k = 1, 2, 4 and k → ∞, and an OT-routed MoE.

Part 1 solves OT between two small point clouds with at most ``k`` nonzeros per column
(:func:`optlayers.solvers.sparse_ot.sparse_ot`) for k = 1, 2, 4 and the quadratically regularized
limit (:func:`quadratic_ot`), prints the objective, the sparsity and the marginal violation (which
a binding ``k`` leaves: the sparse primal is nonconvex), and draws the plans (``plans.png``).

Part 2 trains two small mixture-of-experts classifiers on a task whose input clusters have very
unequal frequencies: one routed by :class:`optlayers.layers.sparse_ot.SparseOTRouter` (each expert
takes at most its capacity, loads balanced by the transport constraint), one by top-1 softmax
gating with Switch-Transformer's auxiliary load-balancing loss. It reports test accuracy, the
spread of the expert loads and the fraction of dropped tokens, and draws the loads
(``moe_load.png``).

Usage: ``python examples/sparse_ot_routing.py [--quick] [--out DIR]`` (``--quick``: a few seconds of
training, for the tests).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from optlayers.layers.sparse_ot import SparseOTRouter, topk_gating
from optlayers.solvers.sparse_ot import DualLBFGS, quadratic_ot, sparse_ot


def plans(out: str, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(n, 2, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.0], dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    C = C / C.max()
    gamma = 10.0 / n  # quadratic support of about 6 per column: k = 1, 2, 4 all bind
    results = []
    for k in (1, 2, 4, None):
        res = (quadratic_ot(None, None, C, gamma=gamma) if k is None
               else sparse_ot(None, None, C, k=k, gamma=gamma, throw=False))
        name = "quadratic (k = ∞)" if k is None else f"k = {k}"
        results.append((name, res))
        print(f"{name:18s} objective {float(res.aux.primal_value):.5f}  dual {float(res.aux.value):.5f}  "
              f"max nnz/column {int(res.aux.max_nnz)}  marginal violation {float(res.aux.marginal_violation):.2e}  "
              f"iterations {int(res.iterations)}")
    try:
        import ot

        print(f"{'EMD (POT)':18s} objective {float(ot.emd2([], [], C.numpy())):.5f}")
    except ImportError:
        pass
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 4.0))
    for ax, (name, res) in zip(axes, results):
        P = res.aux.plan.to_dense().numpy()
        ax.imshow(P, cmap="magma_r", interpolation="nearest")
        ax.set_title(f"{name}\nviolation {float(res.aux.marginal_violation):.1e}")
        ax.set_xlabel("target j")
        ax.set_ylabel("source i")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "plans.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def make_data(n: int, d: int, clusters: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters with skewed frequencies; each cluster labels points by its own linear rule."""
    centers = torch.randn(clusters, d, generator=torch.Generator().manual_seed(1)) * 3
    rules = torch.randn(clusters, d, generator=torch.Generator().manual_seed(2))
    freq = torch.linspace(4.0, 1.0, clusters)
    c = torch.multinomial(freq / freq.sum(), n, replacement=True, generator=g)
    x = centers[c] + torch.randn(n, d, generator=g)
    y = ((x - centers[c]) * rules[c]).sum(-1) > 0
    return x, y.long()


class MoE(nn.Module):
    def __init__(self, d: int, width: int, experts: int, router: str, capacity_factor: float) -> None:
        super().__init__()
        self.embed = nn.Linear(d, width)
        self.kind = router
        self.capacity_factor = capacity_factor
        if router == "ot":
            # a loose stall test: routing needs a good plan, not the last digits of the dual
            self.router = SparseOTRouter(width, experts, capacity_factor=capacity_factor, gamma=0.5,
                                         solver=DualLBFGS(max_iter=100, ftol=1e-4, window=5), throw=False)
        else:
            self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
                                     for _ in range(experts))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.relu(self.embed(x))  # (G, S, width)
        aux_loss = h.new_zeros(())
        if self.kind == "ot":
            dispatch, combine = self.router(h)
        else:
            logits = self.gate(h)
            dispatch, combine = topk_gating(logits, 1, capacity_factor=self.capacity_factor)
            E = logits.shape[-1]  # Switch-Transformer load-balancing loss
            frac = torch.nn.functional.one_hot(logits.argmax(-1), E).float().mean((0, 1))
            aux_loss = 0.01 * E * (frac * torch.softmax(logits, -1).mean((0, 1))).sum()
        xin = torch.einsum("gsec,gsd->egcd", dispatch, h)
        out = torch.stack([f(xin[e]) for e, f in enumerate(self.experts)])
        y = h + torch.einsum("gsec,egcd->gsd", combine, out)
        return self.head(y), dispatch.sum((0, 1, 3)), aux_loss


def _progress(steps: int, label: str, show: bool):  # type: ignore[no-untyped-def]
    if show:
        try:
            from tqdm import tqdm

            return tqdm(range(steps), desc=label, leave=False)
        except ImportError:
            pass
    return range(steps)


def train(kind: str, steps: int, groups: int, tokens: int, experts: int, seed: int,
          progress: bool = False) -> dict[str, object]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d = 8
    model = MoE(d, 32, experts, kind, capacity_factor=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in _progress(steps, kind, progress):
        x, y = make_data(groups * tokens, d, experts, g)
        logits, _, aux = model(x.reshape(groups, tokens, d))
        loss = nn.functional.cross_entropy(logits.reshape(-1, 2), y) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    x, y = make_data(8 * groups * tokens, d, experts, torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits, load, _ = model(x.reshape(8 * groups, tokens, d))
    acc = float((logits.reshape(-1, 2).argmax(-1) == y).float().mean())
    total = x.shape[0]
    return {"accuracy": acc, "load": load, "dropped": 1 - float(load.sum()) / total,
            "load_cv": float(load.std() / load.mean()), "seconds": elapsed}


def moe(out: str, steps: int, groups: int, tokens: int, experts: int, progress: bool = False) -> None:
    rows = {}
    for kind, label in (("ot", "sparse-OT router"), ("topk", "top-1 gating + aux loss")):
        r = train(kind, steps, groups, tokens, experts, seed=0, progress=progress)
        rows[label] = r
        print(f"{label:26s} test accuracy {r['accuracy']:.3f}  expert load CV {r['load_cv']:.3f}  "
              f"dropped tokens {100 * r['dropped']:.1f}%  train {r['seconds']:.1f}s")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.4
    for i, (label, r) in enumerate(rows.items()):
        load = r["load"].numpy()
        ax.bar([e + (i - 0.5) * width for e in range(len(load))], load / load.sum(), width, label=label)
    ax.axhline(1 / experts, color="k", lw=0.8, ls="--", label="balanced")
    ax.set_xticks(range(experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("share of dispatched tokens")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "moe_load.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the tests)")
    parser.add_argument("--out", default="sparse_ot_routing_out", help="output folder for the figures")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids fork/join costs that dominate here
    os.makedirs(args.out, exist_ok=True)
    print("== plans ==")
    plans(args.out, n=12 if args.quick else 30)
    print("== mixture of experts: load balance and accuracy ==")
    if args.quick:
        moe(args.out, steps=6, groups=2, tokens=32, experts=4)
    else:
        moe(args.out, steps=120, groups=8, tokens=64, experts=8, progress=True)
    print(f"figures written to {args.out}/")


if __name__ == "__main__":
    main()

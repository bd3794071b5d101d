"""Hypergradients of the validation loss w.r.t. per-feature L2 penalties of logistic regression.

Problems: scikit-learn's breast-cancer data (d = 30) and synthetic data with d = 5,000 features,
where the adjoint solve matters. Methods, on the same inner solution:

* optlayers implicit: ``hypergradient(..., method=ImplicitAdjoint(CG()))`` and ``Neumann(k, α)``;
* TorchOpt's implicit differentiation (``torchopt.diff.implicit.custom_root`` with ``solve_cg``);
* unrolled differentiation through 100 and 1,000 gradient steps (from zero).

Reported separately: the shared inner solve, and each hypergradient on top of it (median time,
peak memory of a fresh subprocess, error against a dense exact solve).

Default sizes skip Neumann(1000) and the 1,000-step unroll on the d = 5,000 problem (minutes
each); ``--full`` runs them and takes 5 repeats instead of 3.

Run: ``python -m optlayers bench implicit [--full]`` (or ``python benchmarks/bench_implicit.py``).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from typing import Any

import torch

from optlayers.bench import format_table, isolated
from optlayers.implicit import CG, LBFGS, ImplicitAdjoint, Neumann, minimize
from optlayers.implicit.hypergradient import hypergradient

DT = torch.float64
HERE = os.path.abspath(__file__)
CACHE = os.path.join(tempfile.gettempdir(), "optlayers_bench_implicit")


def make_problem(name: str) -> dict[str, Any]:
    """Data, losses' ingredients, the inner solution and the exact hypergradient (cached on disk)."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{name}.pt")
    if os.path.exists(path):
        return torch.load(path)
    g = torch.Generator().manual_seed(0)
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
        X, y = torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)
        perm = torch.randperm(len(y), generator=g)
        X, y = X[perm], y[perm]
        X = (X - X.mean(0)) / X.std(0)
        n = len(y) // 2
        theta = torch.zeros(X.shape[1], dtype=DT)
    else:
        d, n = 5000, 500
        X = torch.randn(2 * n, d, generator=g, dtype=DT) / d ** 0.5 * 10
        w_true = torch.zeros(d, dtype=DT)
        w_true[:50] = torch.randn(50, generator=g, dtype=DT)
        y = (torch.rand(2 * n, generator=g, dtype=DT) < torch.sigmoid(X @ w_true)).to(DT)
        theta = torch.full((d,), -3.0, dtype=DT)  # small penalties: an ill-conditioned inner problem
    prob = {"Xtr": X[:n], "ytr": y[:n], "Xva": X[n:], "yva": y[n:], "theta": theta}
    inner, outer = losses(prob)
    res = minimize(inner, torch.zeros(X.shape[1], dtype=DT), theta,
                   solver=LBFGS(rtol=1e-14, atol=1e-14, max_iter=5000), throw=False)
    w = res.solution.detach()
    prob["w"] = w
    H = torch.func.hessian(inner, argnums=0)(w, theta)
    gw = torch.func.grad(outer, argnums=0)(w, theta)
    u = torch.linalg.solve(H, gw)
    mixed = torch.func.vjp(lambda t: torch.func.grad(inner, argnums=0)(w, t), theta)[1](u)[0]
    prob["exact"] = -mixed
    prob["L"] = float(torch.linalg.eigvalsh(H).max())
    torch.save(prob, path)
    return prob


def losses(prob: dict[str, Any]):  # type: ignore[no-untyped-def]
    Xtr, ytr, Xva, yva = prob["Xtr"], prob["ytr"], prob["Xva"], prob["yva"]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return bce(Xtr @ w, ytr) + 0.5 * (torch.exp(theta) * w ** 2).sum() / len(ytr)

    def outer(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return bce(Xva @ w, yva)

    return inner, outer


def _error(prob: dict[str, Any], hg: torch.Tensor) -> dict[str, float]:
    ex = prob["exact"]
    return {"accuracy": float(torch.linalg.vector_norm(hg - ex) / torch.linalg.vector_norm(ex))}


def case_inner(problem: str) -> Any:
    prob = make_problem(problem)
    inner, _ = losses(prob)
    theta = prob["theta"]

    def run() -> dict[str, float]:
        r = minimize(inner, torch.zeros_like(prob["w"]), theta, solver=LBFGS(), throw=False)
        return {"accuracy": float(torch.linalg.vector_norm(r.solution - prob["w"]) /
                                  torch.linalg.vector_norm(prob["w"]))}

    return run


def case_optlayers(problem: str, method: str, terms: int = 0) -> Any:
    prob = make_problem(problem)
    inner, outer = losses(prob)
    if method == "cg":
        m = ImplicitAdjoint(linear_solver=CG(rtol=1e-8))
    else:
        m = ImplicitAdjoint(linear_solver=Neumann(terms, 1.0 / prob["L"]), throw=False)

    def run() -> dict[str, float]:
        return _error(prob, hypergradient(outer, inner, prob["w"], prob["theta"], method=m, throw=False).solution)

    return run


def case_torchopt(problem: str) -> Any:
    import torchopt

    prob = make_problem(problem)
    inner, outer = losses(prob)
    w_star = prob["w"]

    def optimality(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(inner, argnums=0)(w, theta)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=1000, rtol=1e-8))
    def solve(w0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return w_star.clone()

    def run() -> dict[str, float]:
        theta = prob["theta"].clone().requires_grad_()
        w = solve(torch.zeros_like(w_star), theta)
        (hg,) = torch.autograd.grad(outer(w, theta), theta)
        return _error(prob, hg)

    return run


def case_unroll(problem: str, steps: int) -> Any:
    prob = make_problem(problem)
    inner, outer = losses(prob)
    step = 1.0 / prob["L"]

    def run() -> dict[str, float]:
        theta = prob["theta"].clone().requires_grad_()
        w = torch.zeros_like(prob["w"]).requires_grad_()
        for _ in range(steps):
            (g,) = torch.autograd.grad(inner(w, theta), w, create_graph=True)
            w = w - step * g
        (hg,) = torch.autograd.grad(outer(w, theta), theta)
        return _error(prob, hg)

    return run


CASES = {
    "inner": case_inner,
    "optlayers": case_optlayers,
    "torchopt": case_torchopt,
    "unroll": case_unroll,
}


def run(full: bool = False) -> list[dict[str, Any]]:
    """Run every configuration in its own subprocess; returns the table rows."""
    rows: list[dict[str, Any]] = []
    problems = ["breast_cancer", "synthetic_d5000"]
    for problem in problems:
        make_problem(problem)  # build the cache (and the exact reference) once
        iso = functools.partial(isolated, HERE, repeats=5 if full else 3)
        configs: list[tuple[str, str, dict[str, Any]]] = [
            ("inner solve (shared, L-BFGS)", "inner", {}),
            ("optlayers implicit CG", "optlayers", {"method": "cg"}),
            ("optlayers implicit Neumann(100)", "optlayers", {"method": "neumann", "terms": 100}),
            ("optlayers implicit Neumann(1000)", "optlayers", {"method": "neumann", "terms": 1000}),
            ("torchopt implicit CG", "torchopt", {}),
            ("unrolled 100 steps", "unroll", {"steps": 100}),
            ("unrolled 1000 steps", "unroll", {"steps": 1000}),
        ]
        base = None
        if problem != "breast_cancer" and not full:  # the d = 5,000 long runs take minutes each
            configs = [c for c in configs if c[0] not in ("optlayers implicit Neumann(1000)", "unrolled 1000 steps")]
        for label, case, kw in configs:
            row: dict[str, Any] = {"problem": problem, "library": label}
            if case == "torchopt":
                try:
                    import torchopt  # noqa: F401
                except ImportError:
                    rows.append({**row, "note": "skipped: torchopt not installed"})
                    continue
            res = iso(case, problem=problem, **kw)
            row.update(median_s=res["median_s"], peak_mem_mb=res["peak_mem_mb"], accuracy=res["accuracy"])
            if case == "optlayers" and kw["method"] == "cg":
                base = res["median_s"]
            rows.append(row)
        for row in rows:
            if row["problem"] == problem and base and "median_s" in row and "inner" not in row["library"]:
                row["ratio"] = row["median_s"] / base
    return rows


if __name__ == "__main__":
    sys.exit(print(format_table(run(full="--full" in sys.argv))))

"""Hypergradient and DEQ costs, each relative to the ordinary computation it replaces.

**Hypergradients** (problem ``mlp_wd``): a small tanh MLP on scikit-learn's bundled digits,
float64, with one weight-decay coefficient per parameter *element* (``θ`` has the shape of the
weights: thousands of hyperparameters). Inner problem ``min_w CE_train(w) + ½ Σ e^θ w²``, outer
problem ``CE_val(w)``. The inner solution ``w*`` is computed once (L-BFGS, cached on disk) with
the exact hypergradient (dense Hessian solve) as reference. Rows, all at the same ``w*``:

* one ordinary training step (forward, backward, SGD update on the full training batch): the
  unit of the ``ratio`` column;
* ``hypergradient(..., method=ImplicitAdjoint(CG()))`` — exact implicit (Hessian-vector products);
* ``ImplicitAdjoint(Neumann(k, 1/L))`` — truncated Neumann series;
* ``PenaltyMethod(σ)`` — first-order penalty method (no second derivatives);
* ``UnrollAdjoint(steps=T)`` at two ``T`` — backpropagation through ``T`` gradient steps;
* "T inner steps + implicit CG" at the same two ``T``: the implicit pipeline doing the same ``T``
  inner gradient steps (no graph kept) before its hypergradient. Its peak memory does not grow
  with ``T``; unrolling's grows linearly.

``accuracy`` is the relative error ``‖g − g_exact‖ / ‖g_exact‖`` (blank for the training step).

**DEQ** (problem ``deq``): ``z* = tanh(W z* + U x + b)`` (``‖W‖₂ = 0.9``) on a batch of digits (float32), logits
``V z*``, cross-entropy; forward + backward of :class:`optlayers.layers.DEQ` (Anderson, implicit
adjoint: the default dense per-sample solve, and matrix-free GMRES; and Picard iteration with
GMRES) against the explicit
weight-tied network of the same cell applied ``K`` times, ``K`` the number of Anderson
iterations the DEQ needed (backpropagation through all ``K`` layers), and ``4K``. ``ratio`` is
relative to the explicit network at ``K``; ``accuracy`` is the relative fixed-point residual
``‖f(z) − z‖ / ‖z‖`` of the output. TorchDEQ is run when importable, otherwise its row says
skipped.

Every measurement process first runs ``torch.func``, a hypergradient and a DEQ on tiny inputs,
so one-off lazy initialisation is not charged to the implicit methods. Time: median of repeated
runs (the hypergradient rows: one run by default, three with ``--full``), one intra-op thread
(``OPTLAYERS_BENCH_THREADS``); peak memory: growth of the peak resident set of a fresh
subprocess per configuration (:func:`optlayers.bench.isolated`). Default sizes: MLP 64-32-10 (d
= 2,410), T in (20, 200), DEQ hidden 128 × batch 512 (about 2 minutes of CPU time); ``--full``:
MLP 64-64-10 (d = 4,810), T in (100, 1000), DEQ hidden 256 × batch 1024.
Run ``python -m optlayers bench hyper`` or ``python benchmarks/bench_hyper.py [--full]``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optlayers.bench import format_table, isolated
from optlayers.implicit import CG, GMRES, Anderson, ImplicitAdjoint, Neumann, PenaltyMethod, Picard, UnrollAdjoint
from optlayers.implicit.hypergradient import hypergradient
from optlayers.layers import DEQ

DT = torch.float64
HERE = os.path.abspath(__file__)
CACHE = os.path.join(tempfile.gettempdir(), "optlayers_bench_hyper")
WEIGHT_DECAY = 1e-2
# Small problems: one intra-op thread per measurement process (set OPTLAYERS_BENCH_THREADS to change).
THREADS = int(os.environ.get("OPTLAYERS_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


# ----------------------------------------------------------------------------------------------
# hypergradients of per-parameter weight decay
# ----------------------------------------------------------------------------------------------

def _digits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X_np, y_np = load_digits(return_X_y=True)
    X, y = torch.tensor(X_np, dtype=dtype) / 16.0, torch.tensor(y_np)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return X[perm], y[perm]


def mlp(p: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    return torch.tanh(X @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]


def losses(prob: dict[str, Any]):  # type: ignore[no-untyped-def]
    Xtr, ytr, Xva, yva = prob["Xtr"], prob["ytr"], prob["Xva"], prob["yva"]

    def inner(p: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]) -> torch.Tensor:
        decay = sum((theta[k].exp() * p[k] ** 2).sum() for k in p)
        return F.cross_entropy(mlp(p, Xtr), ytr) + 0.5 * decay

    def outer(p: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(mlp(p, Xva), yva)

    return inner, outer


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def make_problem(hidden: int) -> dict[str, Any]:
    """Data, ``w*``, the exact hypergradient and the Hessian's extreme eigenvalues (cached on disk)."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"mlp_wd_h{hidden}.pt")
    if os.path.exists(path):
        return torch.load(path)
    X, y = _digits(DT)
    n_train, n_val = 600, 600
    prob: dict[str, Any] = {"Xtr": X[:n_train], "ytr": y[:n_train], "Xva": X[n_train:n_train + n_val],
                            "yva": y[n_train:n_train + n_val]}
    g = torch.Generator().manual_seed(0)
    shapes = {"W1": (hidden, 64), "b1": (hidden,), "W2": (10, hidden), "b2": (10,)}
    p = {k: (torch.randn(s, generator=g, dtype=DT) / math.sqrt(s[-1]) if len(s) == 2 else torch.zeros(s, dtype=DT))
         for k, s in shapes.items()}
    theta = {k: torch.full(s, math.log(WEIGHT_DECAY), dtype=DT) for k, s in shapes.items()}
    inner, outer = losses(prob)
    leaves = [v.requires_grad_() for v in p.values()]
    opt = torch.optim.LBFGS(leaves, max_iter=5000, max_eval=10000, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = inner(p, theta)
        loss.backward()
        return loss

    opt.step(closure)
    p = {k: v.detach() for k, v in p.items()}
    keys = sorted(p)
    sizes = [p[k].numel() for k in keys]

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: c.reshape(p[k].shape) for k, c in zip(keys, torch.split(v, sizes))}

    th_flat = _flat(theta)
    f_in = lambda wf, tf: inner(unflat(wf), unflat(tf))  # noqa: E731
    f_out = lambda wf, tf: outer(unflat(wf), unflat(tf))  # noqa: E731
    w = _flat(p)
    grad_in = torch.func.grad(f_in, argnums=0)
    H = torch.func.jacrev(grad_in, argnums=0, chunk_size=256)(w, th_flat)
    H = 0.5 * (H + H.T)
    eig = torch.linalg.eigvalsh(H)
    gw = torch.func.grad(f_out, argnums=0)(w, th_flat)
    u = torch.linalg.solve(H, gw)
    mixed = torch.func.vjp(lambda t: grad_in(w, t), th_flat)[1](u)[0]
    prob.update(w=p, theta=theta, exact=-mixed, L=float(eig[-1]), mu=float(eig[0]),
                inner_grad_norm=float(torch.linalg.vector_norm(grad_in(w, th_flat))), d=w.numel())
    torch.save(prob, path)
    return prob


def _warm_up() -> None:
    """Run torch.func, the hypergradient and a DEQ once on tiny inputs before measuring.

    The first ``torch.func`` transform of a process initialises lazily (about 150 MB of resident
    memory with torch 2.13 on CPU); without this warm-up that one-off cost would be charged to
    every implicit method's peak memory and to none of the plain-autograd baselines.
    """
    x = torch.ones(3, dtype=DT)
    f = lambda w, lam: ((w - 1) ** 2).sum() + (lam * w ** 2).sum()  # noqa: E731
    hypergradient(f, f, x, x)
    deq = DEQ(Cell(3))
    deq(torch.ones(2, 3)).sum().backward()


def _trim_after_first_call(run: Any) -> Any:
    """Wrap ``run`` so that its first call (the warm-up) hands its freed memory back to the OS.

    A warm-up call that ends before the peak-memory window opens leaves its freed heap resident
    (glibc keeps it), so the measured growth would miss every allocation the later calls reuse;
    ``malloc_trim`` after the first call keeps the window's baseline honest.
    """
    state = {"first": True}

    def wrapped() -> Any:
        out = run()
        if state["first"]:
            state["first"] = False
            import ctypes
            import gc

            gc.collect()
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:  # not glibc: nothing to trim
                pass
        return out

    return wrapped


def _rel_err(prob: dict[str, Any], hg: dict[str, torch.Tensor]) -> dict[str, float]:
    ex = prob["exact"]
    return {"accuracy": float(torch.linalg.vector_norm(_flat(hg) - ex) / torch.linalg.vector_norm(ex))}


def case_train_step(hidden: int) -> Any:
    _warm_up()
    prob = make_problem(hidden)
    inner, _ = losses(prob)
    p = {k: v.clone().requires_grad_() for k, v in prob["w"].items()}
    opt = torch.optim.SGD(list(p.values()), lr=1e-3)

    def run() -> dict[str, Any]:
        opt.zero_grad()
        inner(p, prob["theta"]).backward()
        opt.step()
        return {}

    return _trim_after_first_call(run)


def _method(prob: dict[str, Any], method: str, value: float) -> Any:
    if method == "cg":
        return ImplicitAdjoint(linear_solver=CG(rtol=1e-8, max_iter=5000))
    if method == "neumann":
        return ImplicitAdjoint(linear_solver=Neumann(int(value), 1.0 / prob["L"]), throw=False)
    if method == "penalty":
        return PenaltyMethod(sigma=value)
    if method == "unroll":
        return UnrollAdjoint(steps=int(value))
    raise ValueError(method)


def case_hyper(hidden: int, method: str, value: float = 0.0) -> Any:
    _warm_up()
    prob = make_problem(hidden)
    inner, outer = losses(prob)
    m = _method(prob, method, value)

    def run() -> dict[str, Any]:
        res = hypergradient(outer, inner, prob["w"], prob["theta"], method=m, throw=False)
        return {**_rel_err(prob, res.solution), "iterations": int(res.iterations)}

    return _trim_after_first_call(run)


def case_steps_then_cg(hidden: int, steps: int) -> Any:
    """``steps`` inner gradient steps (no graph kept) from ``w*``, then the implicit CG hypergradient."""
    _warm_up()
    prob = make_problem(hidden)
    inner, outer = losses(prob)
    m = _method(prob, "cg", 0.0)
    lr = 1.0 / prob["L"]
    grad = torch.func.grad(inner, argnums=0)

    def run() -> dict[str, Any]:
        p = prob["w"]
        with torch.no_grad():
            for _ in range(steps):
                g = grad(p, prob["theta"])
                p = {k: p[k] - lr * g[k] for k in p}
        res = hypergradient(outer, inner, p, prob["theta"], method=m, throw=False)
        return {**_rel_err(prob, res.solution), "iterations": int(res.iterations)}

    return _trim_after_first_call(run)


# ----------------------------------------------------------------------------------------------
# DEQ against an explicit weight-tied network
# ----------------------------------------------------------------------------------------------

RHO = 0.9


class Cell(nn.Module):
    """``f(z, u) = tanh(W z + u)`` with ``‖W‖₂ = ρ`` at initialization: a ρ-contraction."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        W = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(1))
        self.W = nn.Parameter(RHO * W / torch.linalg.matrix_norm(W, 2))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + u)


def _deq_setup(hidden: int, batch: int) -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    X, y = _digits(torch.float32)
    inject, cell, head = nn.Linear(64, hidden), Cell(hidden), nn.Linear(hidden, 10)
    return inject, cell, head, X[:batch], y[:batch]


def _residual(cell: nn.Module, z: torch.Tensor, u: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.linalg.vector_norm(cell(z, u) - z) / torch.linalg.vector_norm(z))


def case_deq(hidden: int, batch: int, linear_solver: str, solver: str = "anderson") -> Any:
    _warm_up()
    inject, cell, head, X, y = _deq_setup(hidden, batch)
    adjoint = ImplicitAdjoint(linear_solver=GMRES() if linear_solver == "gmres" else "auto")
    deq = DEQ(cell, solver=Anderson(memory=5) if solver == "anderson" else Picard(max_iter=1000), adjoint=adjoint)

    def run() -> dict[str, Any]:
        u = inject(X)
        res = deq.solve(u)
        F.cross_entropy(head(res.solution), y).backward()
        return {"accuracy": _residual(cell, res.solution, u), "iterations": int(res.iterations.max())}

    return _trim_after_first_call(run)


def case_explicit(hidden: int, batch: int, depth: int) -> Any:
    _warm_up()
    inject, cell, head, X, y = _deq_setup(hidden, batch)

    def run() -> dict[str, Any]:
        u = inject(X)
        z = torch.zeros_like(u)
        for _ in range(depth):
            z = cell(z, u)
        F.cross_entropy(head(z), y).backward()
        return {"accuracy": _residual(cell, z, u), "iterations": depth}

    return _trim_after_first_call(run)


def case_torchdeq(hidden: int, batch: int, depth: int) -> Any:
    from torchdeq import get_deq

    _warm_up()
    inject, cell, head, X, y = _deq_setup(hidden, batch)
    deq = get_deq(f_solver="anderson", f_max_iter=4 * depth, f_tol=1e-5, f_stop_mode="rel", ift=True,
                  b_solver="fixed_point_iter", b_max_iter=4 * depth, b_tol=1e-6)

    def run() -> dict[str, Any]:
        u = inject(X)
        z_out, info = deq(lambda z: cell(z, u), torch.zeros_like(u))
        z = z_out[-1]
        F.cross_entropy(head(z), y).backward()
        return {"accuracy": _residual(cell, z, u), "iterations": int(info["nstep"].max())}

    return _trim_after_first_call(run)


CASES = {
    "train_step": case_train_step,
    "hyper": case_hyper,
    "steps_then_cg": case_steps_then_cg,
    "deq": case_deq,
    "explicit": case_explicit,
    "torchdeq": case_torchdeq,
}


def _deq_iterations(hidden: int, batch: int) -> int:
    inject, cell, head, X, _ = _deq_setup(hidden, batch)
    with torch.no_grad():
        res = DEQ(cell, solver=Anderson(memory=5)).solve(inject(X))
    return int(res.iterations.max())


def run(full: bool = False) -> list[dict[str, Any]]:
    """Every configuration in its own subprocess; returns the table rows."""
    rows: list[dict[str, Any]] = []
    hidden = 64 if full else 32
    Ts = (100, 1000) if full else (20, 200)
    prob = make_problem(hidden)  # builds the cache (and the exact reference) once
    problem = f"mlp_wd (d={prob['d']}, cond={prob['L'] / prob['mu']:.0f})"
    configs: list[tuple[str, str, dict[str, Any]]] = [
        ("one training step (fwd+bwd+SGD)", "train_step", {}),
        ("optlayers implicit CG", "hyper", {"method": "cg"}),
        ("optlayers implicit Neumann(100)", "hyper", {"method": "neumann", "value": 100}),
        ("optlayers penalty method (σ=1e-3)", "hyper", {"method": "penalty", "value": 1e-3}),
    ]
    for T in Ts:
        configs.append((f"optlayers unrolled T={T}", "hyper", {"method": "unroll", "value": T}))
    for T in Ts:
        configs.append((f"{T} inner steps + implicit CG", "steps_then_cg", {"steps": T}))
    base = None
    for label, case, kw in configs:
        repeats = 21 if case == "train_step" else (3 if full else 1)  # one run of a seconds-long solve by default
        res = isolated(HERE, case, repeats=repeats, hidden=hidden, **kw)
        if case == "train_step":
            base = res["median_s"]
        rows.append({"problem": problem, "library": label, "median_s": res["median_s"],
                     "ratio": res["median_s"] / base if base else None, "peak_mem_mb": res["peak_mem_mb"],
                     "accuracy": res.get("accuracy"), "iterations": res.get("iterations")})
    # DEQ
    h, b = (256, 1024) if full else (128, 512)
    K = _deq_iterations(h, b)
    problem = f"deq (hidden={h}, batch={b})"
    deq_rows: list[tuple[str, str, dict[str, Any]]] = [
        (f"explicit weight-tied, depth K={K}", "explicit", {"depth": K}),
        (f"explicit weight-tied, depth 4K={4 * K}", "explicit", {"depth": 4 * K}),
        ("optlayers DEQ (Anderson, implicit: dense)", "deq", {"linear_solver": "auto"}),
        ("optlayers DEQ (Anderson, implicit: GMRES)", "deq", {"linear_solver": "gmres"}),
        ("optlayers DEQ (Picard, implicit: GMRES)", "deq", {"linear_solver": "gmres", "solver": "picard"}),
    ]
    base = None
    for label, case, kw in deq_rows:
        res = isolated(HERE, case, repeats=5, hidden=h, batch=b, **kw)
        if base is None:
            base = res["median_s"]
        rows.append({"problem": problem, "library": label, "median_s": res["median_s"],
                     "ratio": res["median_s"] / base, "peak_mem_mb": res["peak_mem_mb"],
                     "accuracy": res.get("accuracy"), "iterations": res.get("iterations")})
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        rows.append({"problem": problem, "library": "torchdeq (Anderson, IFT)",
                     "note": "skipped: torchdeq not importable"})
    else:
        res = isolated(HERE, "torchdeq", repeats=5, hidden=h, batch=b, depth=K)
        rows.append({"problem": problem, "library": "torchdeq (Anderson, IFT)", "median_s": res["median_s"],
                     "ratio": res["median_s"] / base, "peak_mem_mb": res["peak_mem_mb"],
                     "accuracy": res.get("accuracy"), "iterations": res.get("iterations")})
    return rows


if __name__ == "__main__":
    sys.exit(print(format_table(run(full="--full" in sys.argv))))

"""DRO losses: forward + backward cost on CPU, a small MLP's training step, and optlayers vs the
``dro`` package on a linear model.

Three parts (each part runs in a fresh subprocess, all its configurations in that one process —
with ``--full`` the loss rows get one process each, for their peak memory; ``threads`` sets
``torch.set_num_threads`` there, default 1):

* ``losses n=<n> <dtype>``: ``DROLoss(spec)(losses).backward()`` on ``n`` per-example losses
  (n = 4,096 and 65,536; float32 and float64), against ``losses.mean().backward()``. ``accuracy``
  is the relative gap between the robust value and the dual objective at the returned duals (a
  certificate of optimality; None where the spec has no scalar dual). The peak memory (``--full``
  only) is the peak resident set minus the baseline after imports.
* ``mlp step batch=<n> <dtype>``: one SGD step (forward, backward, update) of a small MLP
  (32-64-10, cross-entropy) at batch ``n`` (4,096 and 65,536, so the DRO weights are over ``n``
  losses) with each robust loss, against the same step with the plain mean. The two steps are
  *interleaved* in one process (mean, spec, mean, spec, ...) on two identical models, so both see
  the same machine load; ``ratio`` is the median over pairs of spec time / mean time, with its
  25-75 % spread (``ratio_q1``, ``ratio_q3``).
* ``fit logistic``: minimise the robust logistic loss of a linear model (d = 10, labels +-1) with
  optlayers (``DROLoss`` / ``wasserstein_linear_risk`` + ``torch.optim.LBFGS``, float64; for the TV
  ball, whose ``eps * max`` term stalls L-BFGS at its kink, a short continuation on a
  log-sum-exp smoothing of the max comes first, timed with the rest) and with the
  ``dro`` package (cvxpy + CLARABEL), for the sets both implement: CVaR, chi-square ball, KL ball,
  total variation, Wasserstein (labels fixed, and label flips with cost kappa). ``objective`` is
  the robust objective at each returned model, evaluated *exactly by the same code* (optlayers'
  closed forms / root-finds, validated against CVXPY in the tests); ``accuracy`` is its relative
  excess over the better of the two; ``reported`` is what ``dro`` itself reports
  (``model.robust_obj``). The ``dro`` side runs in its own virtual environment (``pip install
  dro`` would replace torch with a CUDA build): see ``benchmarks/envs/dro.sh``; the benchmark finds
  it through ``OPTLAYERS_DRO_VENV`` (default ``~/.cache/optlayers/venv-dro``) and otherwise says
  the rows are skipped.

Conventions (checked by the ``reported`` column): ``dro``'s ``CVaRDRO(alpha)`` averages the worst
``alpha`` fraction (= ``CVaR(alpha)``); ``Chi2DRO(eps)`` is the ball
:math:`\\frac1n\\sum_i(np_i-1)^2\\le\\varepsilon` (= ``ChiSquareBall(eps)``); ``KLDRO(eps)`` is
:math:`\\mathrm{KL}(p\\|u)\\le\\varepsilon` (= ``KLBall(eps)``); ``TVDRO(eps)`` mixes
:math:`(1-\\varepsilon)\\,\\mathrm{CVaR}_{1-\\varepsilon}` and :math:`\\varepsilon\\max` (=
``TotalVariation(eps)``); ``WassersteinDRO(eps, p, kappa)`` with a logistic model is
:math:`\\min_{\\lambda\\ge\\|\\theta\\|_*}\\lambda\\varepsilon+\\frac1n\\sum_i\\max(\\ell_i,
\\ell_i^{\\text{flip}}-\\lambda\\kappa)` (= ``wasserstein_linear_risk(eps, kappa=, p=)``).

Run ``python benchmarks/bench_dro.py [--full] [--json PATH] [--threads T] [--only losses,mlp,fit]``;
``run(full)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SPECS: dict[str, str] = {
    "mean": "None",
    "CVaR(0.1)": "CVaR(0.1)",
    "CVaR(0.1) reference": "CVaR(0.1)|reference",
    "CVaR(0.1) numba": "CVaR(0.1)|numba",
    "TotalVariation(0.1)": "TotalVariation(0.1)",
    "ChiSquareBall(1)": "ChiSquareBall(1.0)",
    "ChiSquareBall(1) reference": "ChiSquareBall(1.0)|reference",
    "ChiSquareBall(1) numba": "ChiSquareBall(1.0)|numba",
    "ChiSquarePenalty(1)": "ChiSquarePenalty(1.0)",
    "KLBall(0.5)": "KLBall(0.5)",
    "KLPenalty(1)": "KLPenalty(1.0)",
    "CressieRead(3, rho=0.5)": "CressieRead(3.0, rho=0.5)",
    "CressieRead(1.5, lam=1)": "CressieRead(1.5, lam=1.0)",
    "Spectral(esrm(1), lam=0.1)": "Spectral(esrm(1.0), lam=0.1)",
    "Spectral(esrm(1), lam=0.1) reference": "Spectral(esrm(1.0), lam=0.1)|reference",
    "Spectral(extremile(2), lam=0.1, kl)": "Spectral(extremile(2.0), lam=0.1, divergence='kl')",
    "HolisticRobust(0.05, 0.1)": "HolisticRobust(0.05, 0.1)",
}
MLP_SPECS = ["CVaR(0.1)", "TotalVariation(0.1)", "ChiSquareBall(1)", "ChiSquarePenalty(1)", "KLBall(0.5)",
             "KLPenalty(1)", "CressieRead(3, rho=0.5)", "CressieRead(1.5, lam=1)", "Spectral(esrm(1), lam=0.1)",
             "Spectral(extremile(2), lam=0.1, kl)", "HolisticRobust(0.05, 0.1)"]
# (row name, optlayers spec expression or a Wasserstein tuple, dro class, dro config)
FIT_SPECS: list[tuple[str, Any, str, dict[str, Any]]] = [
    ("CVaR(0.1)", "CVaR(0.1)", "CVaRDRO", {"alpha": 0.1}),
    ("ChiSquareBall(0.5)", "ChiSquareBall(0.5)", "Chi2DRO", {"eps": 0.5}),
    ("KLBall(0.1)", "KLBall(0.1)", "KLDRO", {"eps": 0.1}),
    ("KLBall(0.5)", "KLBall(0.5)", "KLDRO", {"eps": 0.5}),
    ("TotalVariation(0.05)", "TotalVariation(0.05)", "TVDRO", {"eps": 0.05}),
    ("Wasserstein(0.05, p=2)", ("wasserstein", 0.05, float("inf")), "WassersteinDRO",
     {"eps": 0.05, "p": 2, "kappa": "inf"}),
    ("Wasserstein(0.05, p=2, kappa=1)", ("wasserstein", 0.05, 1.0), "WassersteinDRO",
     {"eps": 0.05, "p": 2, "kappa": 1.0}),
]


# Not measured here: fast-dro (Levy et al.) and Prospect (Mehta et al.) are not on PyPI (PyPI's
# ``prospect`` is an unrelated package). Their published claims, quoted as published.
PUBLISHED: list[dict[str, str]] = [
    {"library": "fast-dro (Levy et al., NeurIPS 2020)",
     "claim": "gradient complexity independent of n and d; '9-36 times more efficient than full-batch methods' "
              "on MNIST/ImageNet (paper abstract); default bisection tolerance 1e-4 (its code)"},
    {"library": "Prospect (Mehta et al., ICLR 2024)",
     "claim": "linear convergence with a single step size; '2-3 times faster than baselines such as stochastic "
              "gradient and stochastic saddle-point methods' on tabular, vision and language shift/fairness "
              "benchmarks (ronakdm/prospect README)"},
]


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _spec_namespace() -> dict[str, Any]:
    from optlayers.solvers import dro as D

    return {name: getattr(D, name) for name in ("ChiSquareBall", "ChiSquarePenalty", "CressieRead", "CVaR",
                                                "HolisticRobust", "KLBall", "KLPenalty", "Spectral",
                                                "TotalVariation", "esrm", "extremile")}


def _parse_spec(expr: str) -> tuple[Any, str | None]:
    body, _, backend = expr.partition("|")
    return eval(body, _spec_namespace()), (backend or None)  # noqa: S307 - a fixed table of expressions above


def _worker_batch(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Several configurations in this one process (``cfg["items"]``: configs of one kind)."""
    worker = {"losses": _worker_losses, "mlp": _worker_mlp, "fit_ours": _worker_fit_ours}[cfg["sub"]]
    return [worker({**item, "batched": True}) for item in cfg["items"]]


def _worker_losses(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from optlayers.layers.dro import DROLoss
    from optlayers.solvers.dro import dual_value, robust_weights

    dtype = getattr(torch, cfg["dtype"])
    spec, backend = _parse_spec(cfg["spec"])
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(cfg["n"], generator=gen, dtype=torch.float64).to(dtype) * 3.0
    loss_fn = None if spec is None else DROLoss(spec, backend=backend)

    def step() -> Any:
        x = base.clone().requires_grad_(True)
        v = x.mean() if loss_fn is None else loss_fn(x)
        v.backward()
        return v

    for _ in range(3):
        step()
    baseline = _peak_rss_mb()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # peak resident set: meaningful only when this configuration has the process to itself
    peak = None if cfg.get("batched") else round(_peak_rss_mb() - baseline, 2)
    accuracy = None
    if spec is not None:
        lv = base.to(torch.float64)
        res = robust_weights(lv, spec)
        try:
            dv = float(dual_value(lv, spec, res.aux.dual))
            accuracy = abs(dv - float(res.aux.value)) / abs(float(res.aux.value))
        except NotImplementedError:
            accuracy = None
    q1, med, q3 = _quartiles(times)
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "peak_mem_mb": peak, "accuracy": accuracy}


def _worker_mlp(cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved timing of the plain-mean step and the robust step on two identical MLPs."""
    import copy

    import torch

    from optlayers.layers.dro import DROLoss

    dtype = getattr(torch, cfg["dtype"])
    spec, backend = _parse_spec(cfg["spec"])
    gen = torch.Generator().manual_seed(0)
    n = cfg["n"]
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(dtype)
    model_b = copy.deepcopy(model_a)
    x = torch.randn(n, 32, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    crit = torch.nn.CrossEntropyLoss(reduction="none")
    loss_fn = DROLoss(spec, backend=backend)

    def make_step(model: torch.nn.Module, robust: bool) -> Any:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step() -> None:
            opt.zero_grad()
            losses = crit(model(x), y)
            v = loss_fn(losses) if robust else losses.mean()
            v.backward()
            opt.step()
        return step

    plain, robust = make_step(model_a, False), make_step(model_b, True)
    for _ in range(3):
        plain()
        robust()
    tp, tr, ratios = [], [], []
    for i in range(cfg["repeats"]):
        order = (plain, robust) if i % 2 == 0 else (robust, plain)
        dt = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            dt[fn] = time.perf_counter() - t0
        tp.append(dt[plain])
        tr.append(dt[robust])
        ratios.append(dt[robust] / dt[plain])
    p1, pm, p3 = _quartiles(tp)
    r1, rm, r3 = _quartiles(tr)
    q1, qm, q3 = _quartiles(ratios)
    return {"mean_median_s": pm, "mean_q1_s": p1, "mean_q3_s": p3, "median_s": rm, "q1_s": r1, "q3_s": r3,
            "ratio": qm, "ratio_q1": q1, "ratio_q3": q3, "pairs": len(ratios)}


def _logistic_problem(path: str) -> tuple[Any, Any]:
    import numpy as np

    data = np.load(path)
    return data["X"], data["y"]


def _worker_fit_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fit with optlayers (L-BFGS on the exact robust loss), then evaluate both models exactly."""
    import torch
    import torch.nn.functional as F

    from optlayers.layers.dro import DROLoss, wasserstein_linear_risk
    from optlayers.solvers.dro import robust_weights

    X_np, y_np = _logistic_problem(cfg["data"])
    X = torch.from_numpy(X_np).to(torch.float64)
    y = torch.from_numpy(y_np).to(torch.float64)
    what = cfg["spec"]
    if isinstance(what, list):  # ("wasserstein", eps, kappa)
        eps, kappa = float(what[1]), float(what[2])

        def objective(w: Any, b: Any) -> Any:
            return wasserstein_linear_risk(w, b, X, y, eps, kappa=kappa, loss="logistic", p=2.0)

        exact = objective
    stages: list[tuple[Any, int]] = []  # smoothed stages before the exact objective: (objective, max_iter)
    if not isinstance(what, list):
        from optlayers.solvers.dro import CVaR, KLPenalty, TotalVariation

        spec, _ = _parse_spec(what)
        loss = DROLoss(spec)

        def objective(w: Any, b: Any) -> Any:
            return loss(F.softplus(-y * (X @ w + b)))

        def exact(w: Any, b: Any) -> Any:
            return robust_weights(F.softplus(-y * (X @ w + b)), spec, tol=1e-14).aux.value

        if isinstance(spec, TotalVariation) and 0.0 < spec.eps < 1.0:
            # TV = (1 - eps) CVaR_{1-eps} + eps max. L-BFGS (strong Wolfe) stalls at the kink of the
            # max term (several examples tie at the worst loss at the optimum): continuation on
            # max ~ KLPenalty(s) = s log mean exp(l / s) (error <= s log n), s = 0.1 ... 1e-6, 60
            # iterations each from the previous stage, then the exact objective (all timed)
            eps = spec.eps
            cvar = DROLoss(CVaR(1.0 - eps))
            for s in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
                soft = DROLoss(KLPenalty(s))

                def smoothed(w: Any, b: Any, soft: Any = soft) -> Any:
                    losses = F.softplus(-y * (X @ w + b))
                    return (1.0 - eps) * cvar(losses) + eps * soft(losses)

                stages.append((smoothed, 60))

    def fit() -> tuple[Any, Any, int]:
        # warm start at the plain logistic regression (at w = 0 all losses tie at log 2, a kink of
        # CVaR/TV), then L-BFGS on the robust objective; all stages are timed
        w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        evals = [0]
        erm = lambda w, b: F.softplus(-y * (X @ w + b)).mean()  # noqa: E731
        for obj, max_iter in [(erm, cfg["max_iter"]), *stages, (objective, cfg["max_iter"])]:
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                                    tolerance_grad=1e-10, tolerance_change=1e-15, history_size=20,
                                    line_search_fn="strong_wolfe")

            def closure(obj: Any = obj, opt: Any = opt) -> Any:
                opt.zero_grad()
                v = obj(w, b)
                v.backward()
                evals[0] += 1
                return v

            opt.step(closure)
        return w.detach(), b.detach(), evals[0]

    fit()  # warm-up
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        w, b, evals = fit()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        obj = float(exact(w, b))
        obj_dro = None
        if cfg.get("dro_theta") is not None:
            wd = torch.tensor(cfg["dro_theta"], dtype=torch.float64)
            obj_dro = float(exact(wd, torch.tensor(float(cfg["dro_b"]), dtype=torch.float64)))
    return {"median_s": statistics.median(times), "objective": obj, "objective_dro": obj_dro, "evals": evals}


def _import_dro_linear_models() -> Any:
    """``dro.linear_model`` without executing ``dro/__init__.py`` (which imports the neural and tree
    models and their dependencies: torchvision, torchattacks, xgboost, lightgbm, ucimlrepo, pandas)."""
    import importlib
    import importlib.util
    import types

    if "dro.linear_model" in sys.modules:  # a second fit in the same process
        return sys.modules["dro.linear_model"]
    found = importlib.util.find_spec("dro")
    if found is None or not found.submodule_search_locations:
        raise ImportError("the dro package is not installed in this environment")
    pkg = types.ModuleType("dro")
    pkg.__path__ = list(found.submodule_search_locations)
    sys.modules.setdefault("dro", pkg)
    return importlib.import_module("dro.linear_model")


def _worker_fit_dro(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the dro virtual environment."""
    from importlib.metadata import version

    lm = _import_dro_linear_models()
    X, y = _logistic_problem(cfg["data"])
    times, model = [], None
    for _ in range(cfg["repeats"]):
        model = getattr(lm, cfg["cls"])(input_dim=X.shape[1], model_type="logistic", fit_intercept=True)
        model.update(dict(cfg["config"]))
        t0 = time.perf_counter()
        model.fit(X, y)
        times.append(time.perf_counter() - t0)
    assert model is not None
    return {"median_s": statistics.median(times), "theta": [float(v) for v in model.theta], "b": float(model.b),
            "reported": float(model.robust_obj), "version": version("dro")}


def dro_python() -> str | None:
    """The interpreter of the dro virtual environment, or None when there is none."""
    venv = os.environ.get("OPTLAYERS_DRO_VENV", os.path.expanduser("~/.cache/optlayers/venv-dro"))
    py = os.path.join(venv, "bin", "python")
    return py if os.path.exists(py) else None


def _spawn(cfg: dict[str, Any], python: str | None = None) -> dict[str, Any]:
    out = subprocess.run([python or sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _root()})
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {cfg}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _root() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + extra if extra else "")


def _loss_rows(full: bool, threads: int) -> list[dict[str, Any]]:
    """Default: every configuration in one process (no peak memory); ``--full``: one process per
    configuration (with its peak memory) and more repeats."""
    repeats = 41 if full else 11
    cfgs = [{"kind": "losses", "n": n, "dtype": dtype, "spec": expr, "repeats": repeats, "threads": threads}
            for dtype in ("float32", "float64") for n in (4096, 65536) for expr in SPECS.values()]
    results = [_spawn(c) for c in cfgs] if full else _spawn({"kind": "batch", "sub": "losses", "items": cfgs,
                                                              "threads": threads})
    names = list(SPECS) * (len(cfgs) // len(SPECS))
    rows: list[dict[str, Any]] = []
    base = None
    for name, c, res in zip(names, cfgs, results):
        base = res["median_s"] if name == "mean" else base
        rows.append({"problem": f"losses n={c['n']} {c['dtype']}", "library": f"optlayers {name}",
                     "ratio": res["median_s"] / base if base else None, **res})
    return rows


def _mlp_rows(full: bool, threads: int) -> list[dict[str, Any]]:
    """All specs of one batch size in one process (batch 65,536 only with ``--full``: minutes)."""
    rows: list[dict[str, Any]] = []
    for n in (4096, 65536) if full else (4096,):
        repeats = (101 if full else 31) if n == 4096 else 41
        cfgs = [{"kind": "mlp", "n": n, "dtype": dtype, "spec": SPECS[name], "repeats": repeats, "threads": threads}
                for dtype in ("float32", "float64") for name in MLP_SPECS]
        results = _spawn({"kind": "batch", "sub": "mlp", "items": cfgs, "threads": threads})
        for name, c, res in zip(MLP_SPECS * 2, cfgs, results):
            rows.append({"problem": f"mlp step batch={n} {c['dtype']}", "library": f"optlayers {name}",
                         "peak_mem_mb": None, "accuracy": None, **res})
    return rows


def _make_logistic_data(path: str, n: int, d: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = np.sign(X @ w + 0.3 * rng.standard_normal(n) + 0.3)
    y[y == 0] = 1.0
    np.savez(path, X=X, y=y)


def _fit_rows(full: bool, threads: int) -> list[dict[str, Any]]:
    """All ``dro`` fits in one process of its environment, then all optlayers fits in one process."""
    py = dro_python()
    sizes = (1000, 5000) if full else (1000,)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = os.path.join(tmp, f"logistic_{n}.npz")
            _make_logistic_data(data, n, 10, seed=0)
            problem = f"fit logistic n={n} d=10"
            dro_all: list[dict[str, Any] | None] = [None] * len(FIT_SPECS)
            note = None
            if py is None:
                note = ("skipped: no dro environment (run benchmarks/envs/dro.sh, or set OPTLAYERS_DRO_VENV "
                        "to a venv with the dro package)")
            else:
                items = [{"kind": "fit_dro", "data": data, "cls": cls, "config": config, "repeats": 3 if full else 1,
                          "threads": threads} for _, _, cls, config in FIT_SPECS]
                out = _spawn({"kind": "fit_dro_batch", "items": items, "threads": threads}, python=py)
                dro_all = [r if "error" not in r else None for r in out]
                errors = [r.get("error") for r in out]
            ours_items = []
            for (_name, what, _cls, _config), dro_res in zip(FIT_SPECS, dro_all):
                ours_items.append({"kind": "fit_ours", "data": data, "spec": list(what) if isinstance(what, tuple)
                                   else what, "repeats": 5 if full else 3, "max_iter": 500, "threads": threads,
                                   "dro_theta": None if dro_res is None else dro_res["theta"],
                                   "dro_b": None if dro_res is None else dro_res["b"]})
            ours_all = _spawn({"kind": "batch", "sub": "fit_ours", "items": ours_items, "threads": threads})
            for i, ((name, _what, _cls, _config), dro_res, ours) in enumerate(zip(FIT_SPECS, dro_all, ours_all)):
                best = ours["objective"] if ours["objective_dro"] is None else min(ours["objective"],
                                                                                 ours["objective_dro"])
                rows.append({"problem": f"{problem} {name}", "library": "optlayers L-BFGS",
                             "median_s": ours["median_s"], "ratio": 1.0, "peak_mem_mb": None,
                             "accuracy": (ours["objective"] - best) / abs(best), "objective": ours["objective"],
                             "reported": None, "evals": ours["evals"]})
                if dro_res is not None:
                    rows.append({"problem": f"{problem} {name}", "library": f"dro {dro_res['version']} cvxpy/CLARABEL",
                                 "median_s": dro_res["median_s"], "ratio": dro_res["median_s"] / ours["median_s"],
                                 "peak_mem_mb": None, "accuracy": (ours["objective_dro"] - best) / abs(best),
                                 "objective": ours["objective_dro"], "reported": dro_res["reported"]})
                else:
                    why = note if py is None else f"dro failed: {str(errors[i]).strip().splitlines()[-1][:160]}"
                    rows.append({"problem": f"{problem} {name}", "library": "dro", "median_s": None, "ratio": None,
                                 "peak_mem_mb": None, "accuracy": None, "objective": None, "reported": None,
                                 "note": why})
    return rows


def run(full: bool = False, threads: int | None = None, parts: tuple[str, ...] = ("losses", "mlp", "fit"),
        device: str = "cpu") -> list[dict[str, Any]]:
    """Run the benchmark; rows of ``{problem, library, median_s, ratio, peak_mem_mb, accuracy}`` plus
    extra keys (spreads, ``objective``, ``reported``, ``note``). CPU only."""
    if device != "cpu":
        raise ValueError("bench_dro measures the CPU; device must be 'cpu'")
    t = 1 if threads is None else int(threads)
    rows: list[dict[str, Any]] = []
    if "losses" in parts:
        rows += _loss_rows(full, t)
    if "mlp" in parts:
        rows += _mlp_rows(full, t)
    if "fit" in parts:
        rows += _fit_rows(full, t)
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu",
            "loadavg": os.getloadavg()}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Three text tables (losses, MLP step, fits)."""
    lines: list[str] = []
    loss = [r for r in rows if r["problem"].startswith("losses")]
    mlp = [r for r in rows if r["problem"].startswith("mlp")]
    fit = [r for r in rows if r["problem"].startswith("fit")]
    if loss:
        lines.append(f"{'problem':<24} {'library':<44} {'median ms':>10} {'IQR ms':>17} {'ratio':>7} {'peak MB':>8} "
                     f"{'dual gap':>9}")
        for r in loss:
            iqr = f"{1e3 * r['q1_s']:.3f}-{1e3 * r['q3_s']:.3f}"
            lines.append(f"{r['problem']:<24} {r['library']:<44} {_fmt(1e3 * r['median_s'], '10.3f')} {iqr:>17} "
                         f"{_fmt(r['ratio'], '7.2f')} {_fmt(r['peak_mem_mb'], '8.1f')} {_fmt(r['accuracy'], '9.1e')}")
    if mlp:
        lines.append("")
        lines.append(f"{'problem':<28} {'library':<44} {'mean ms':>8} {'robust ms':>10} {'ratio':>6} "
                     f"{'ratio IQR':>12} {'pairs':>5}")
        for r in mlp:
            lines.append(f"{r['problem']:<28} {r['library']:<44} {1e3 * r['mean_median_s']:8.2f} "
                         f"{1e3 * r['median_s']:10.2f} {r['ratio']:6.3f} "
                         f"{r['ratio_q1']:5.3f}-{r['ratio_q3']:5.3f} {r['pairs']:5d}")
    if fit:
        lines.append("")
        lines.append(f"{'problem':<52} {'library':<26} {'fit ms':>9} {'ratio':>7} {'objective':>14} "
                     f"{'excess':>9} {'dro reports':>14}")
        for r in fit:
            med = None if r["median_s"] is None else 1e3 * r["median_s"]
            note = f"  {r['note']}" if r.get("note") else ""
            lines.append(f"{r['problem']:<52} {r['library']:<26} {_fmt(med, '9.1f')} {_fmt(r['ratio'], '7.2f')} "
                         f"{_fmt(r['objective'], '14.10f')} {_fmt(r['accuracy'], '9.1e')} "
                         f"{_fmt(r.get('reported'), '14.10f')}{note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="DRO loss benchmark")
    parser.add_argument("--full", action="store_true", help="more repeats, and n = 5,000 for the fits")
    parser.add_argument("--json", default=None, help="write rows and machine info to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    parser.add_argument("--only", default="losses,mlp,fit", help="comma-separated parts: losses, mlp, fit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        cfg = json.loads(args.worker)
        if cfg["kind"] == "fit_dro":
            print(json.dumps(_worker_fit_dro(cfg)))
            return
        if cfg["kind"] == "fit_dro_batch":  # one failing fit does not lose the others
            out = []
            for item in cfg["items"]:
                try:
                    out.append(_worker_fit_dro(item))
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    out.append({"error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(out))
            return
        import torch

        torch.set_num_threads(int(cfg.get("threads") or 1))
        worker = {"losses": _worker_losses, "mlp": _worker_mlp, "fit_ours": _worker_fit_ours,
                  "batch": _worker_batch}[cfg["kind"]]
        print(json.dumps(worker(cfg)))
        return
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    load0 = os.getloadavg()
    rows = run(full=args.full, threads=args.threads, parts=parts)
    print(format_rows(rows))
    print("\npublished numbers (not measured here):")
    for pub in PUBLISHED:
        print(f"  {pub['library']}: {pub['claim']}")
    print(f"\nload average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {**machine(), "threads": args.threads or 1}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

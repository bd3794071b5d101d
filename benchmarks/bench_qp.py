"""Batched dense QPs, forward + backward: optlayers vs qpth vs cvxpylayers.

Problem (qpth's own benchmark setting): ``min ½xᵀQx + pᵀx s.t. Ax = b, Gx ≤ h`` with
``Q = LLᵀ/nz + 0.1 I``, random ``p, G, A``, ``h = G x0 + s0`` and ``b = A x0`` (feasible by
construction), every element of the batch different. One measured call = forward solve of the
whole batch + backward of ``Σ w ⊙ x*`` to all of ``Q, p, G, h, A, b`` (``L`` for cvxpylayers, whose
conic path cannot take a parametric ``Q``).

Libraries, each in a fresh subprocess (median time, peak resident-set growth):

* **optlayers** — :func:`optlayers.layers.qp` (interior point, implicit KKT gradients); on the CPU
  the whole interior-point solve is one compiled Numba call per batch (kernel
  ``"qp.interior_point"``, :mod:`optlayers.kernels.qp_ipm_numba`: each element's iterations in
  cache, the same iterations as the batched PyTorch loop, which ``OPTLAYERS_KERNELS=reference``
  times instead), and it also makes the KKT factorization at the solution for the gradient;
* **qpth** — ``QPFunction`` (OptNet), from the separate environment of ``benchmarks/envs/qpth.sh``
  (qpth pins numpy<2, so it never enters the project's environment); skipped when that
  environment is absent;
* **cvxpylayers** — ``CvxpyLayer`` with ``solver_args={'eps': 1e-10}`` (diffcp/SCS; diffcp's thread
  pool limited to the same thread count as the others: ``n_jobs_forward = n_jobs_backward``), float64 at
  the default size only (its per-instance canonicalization makes large sizes very slow).

``accuracy`` is ``max |x − x_ref| / max |x_ref|`` over the batch, against a float64 reference
solved by optlayers at tight tolerance and checked against CVXPY/Clarabel on a few elements;
rows whose solutions disagree (> 1e-4 in float64, > 1e-2 in float32) are flagged in ``note``.
``ratio`` is a library's time over optlayers' on the same problem; ``cpu_s`` is the median
process CPU time (all threads), a steadier figure than wall time on a shared machine. Every library
runs with one
BLAS thread (``OPTLAYERS_BENCH_THREADS`` overrides), which is fastest for batches of small
matrices on a 2-core machine.

Default sizes (under 90 s of CPU time): batch 128, nz=50, 50 inequalities, 10 equalities in
float64 and float32, and batch 32 in float64. ``--full`` adds the scaling with the batch size (32,
128, 512) and with nz (50, 100, 200; as many inequalities, nz/5 equalities) in float64 and
float32, cvxpylayers on the scaling rows, and a row with few inequalities (batch 128, nz=100, 20
inequalities, 10 equalities), where the batched PyTorch loop (``OPTLAYERS_KERNELS=reference``)
runs in its inequality Schur-complement form (``InteriorPoint(kkt_form="auto")`` picks it in
float64 when ``m ≤ 3n/4`` and the compiled kernel does not run; the compiled normal-equation solve
was 2.9× faster than that form there).

Run: ``python -m optlayers bench qp`` or ``python benchmarks/bench_qp.py [--full]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(tempfile.gettempdir(), "optlayers_bench_qp")
QPTH_VENV = os.environ.get("OPTLAYERS_QPTH_VENV", os.path.expanduser("~/.cache/optlayers/venv-qpth"))


def make_problem(B: int, nz: int, nineq: int, neq: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic problem data ``[L, Q, p, G, h, A, b, w]`` (w weights the loss)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    L = torch.randn(B, nz, nz, generator=g, dtype=dt) / nz ** 0.5
    L = torch.linalg.cholesky(L @ L.mT + 0.1 * torch.eye(nz, dtype=dt))
    Q = L @ L.mT
    p = torch.randn(B, nz, generator=g, dtype=dt)
    G = torch.randn(B, nineq, nz, generator=g, dtype=dt)
    x0 = torch.randn(B, nz, generator=g, dtype=dt)
    s0 = torch.rand(B, nineq, generator=g, dtype=dt)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + s0
    A = torch.randn(B, neq, nz, generator=g, dtype=dt)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    w = torch.randn(B, nz, generator=g, dtype=dt)
    return [t.to(dtype) for t in (L, Q, p, G, h, A, b, w)]


def _key(B: int, nz: int, nineq: int, neq: int) -> str:
    return f"B{B}_nz{nz}_m{nineq}_p{neq}"


def reference(B: int, nz: int, nineq: int, neq: int) -> torch.Tensor:
    """Float64 reference solution (cached on disk), checked against CVXPY on three elements."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, _key(B, nz, nineq, neq) + ".pt")
    if os.path.exists(path):
        return torch.load(path)
    from optlayers.layers.qp import qp
    from optlayers.solvers.qp import InteriorPoint

    _, Q, p, G, h, A, b, _ = make_problem(B, nz, nineq, neq, torch.float64)
    x = qp(Q, p, G, h, A, b, solver=InteriorPoint(rtol=1e-13, atol=1e-13, max_iter=80)).solution
    try:
        import cvxpy as cp

        for i in (0, B // 2, B - 1):
            z = cp.Variable(nz)
            prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q[i].numpy())) + p[i].numpy() @ z),
                              [G[i].numpy() @ z <= h[i].numpy(), A[i].numpy() @ z == b[i].numpy()])
            prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
            err = float(abs(torch.as_tensor(z.value) - x[i]).max())
            if err > 1e-6:
                raise RuntimeError(f"reference solution disagrees with CVXPY by {err:.2e} on element {i}")
    except ImportError:
        pass
    torch.save(x, path)
    return x


def _accuracy(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref).abs().max() / ref.abs().max())


# --------------------------------------------------------------------------------------------
# Cases: CASES[name](**kw) does the set-up and returns the measured callable.
def case_optlayers(B: int, nz: int, nineq: int, neq: int, dtype: str) -> Any:
    from optlayers.layers.qp import qp

    dt = getattr(torch, dtype)
    _, Q, p, G, h, A, b, w = make_problem(B, nz, nineq, neq, dt)
    ref = reference(B, nz, nineq, neq)

    def run() -> dict[str, float]:
        args = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
        x = qp(*args).solution
        (x * w).sum().backward()
        return {"accuracy": _accuracy(x, ref)}

    return run


def case_qpth(B: int, nz: int, nineq: int, neq: int, dtype: str) -> Any:
    from qpth.qp import QPFunction, QPSolvers

    dt = getattr(torch, dtype)
    _, Q, p, G, h, A, b, w = make_problem(B, nz, nineq, neq, dt)
    ref = torch.load(os.path.join(CACHE, _key(B, nz, nineq, neq) + ".pt"))

    def run() -> dict[str, float]:
        args = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
        x = QPFunction(verbose=-1, eps=1e-12 if dt == torch.float64 else 1e-6, maxIter=50,
                       solver=QPSolvers.PDIPM_BATCHED)(*args)
        (x * w).sum().backward()
        return {"accuracy": _accuracy(x, ref)}

    return run


def case_cvxpylayers(B: int, nz: int, nineq: int, neq: int, dtype: str) -> Any:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    dt = getattr(torch, dtype)
    L, _, p, G, h, A, b, w = make_problem(B, nz, nineq, neq, dt)
    ref = reference(B, nz, nineq, neq)
    Lp, pp, Gp, hp, Ap, bp = (cp.Parameter((nz, nz)), cp.Parameter(nz), cp.Parameter((nineq, nz)),
                              cp.Parameter(nineq), cp.Parameter((neq, nz)), cp.Parameter(neq))
    z = cp.Variable(nz)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp.T @ z) + pp @ z), [Gp @ z <= hp, Ap @ z == bp])
    layer = CvxpyLayer(prob, parameters=[Lp, pp, Gp, hp, Ap, bp], variables=[z])

    # diffcp's batch runs on a thread pool of all CPUs by default; give it the thread count the
    # other libraries get (OPTLAYERS_BENCH_THREADS, default 1), like their BLAS
    jobs = torch.get_num_threads()
    solver_args = {"eps": 1e-10, "n_jobs_forward": jobs, "n_jobs_backward": jobs}

    def run() -> dict[str, float]:
        args = [t.clone().requires_grad_() for t in (L, p, G, h, A, b)]
        (x,) = layer(*args, solver_args=solver_args)
        (x * w).sum().backward()
        return {"accuracy": _accuracy(x, ref)}

    return run


CASES = {"optlayers": case_optlayers, "qpth": case_qpth, "cvxpylayers": case_cvxpylayers}

_CHILD = r"""
import gc, json, sys, time, importlib.util
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
spec = importlib.util.spec_from_file_location("bench_qp_case", {path!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
run = mod.CASES[{case!r}](**json.loads(sys.argv[1]))
def rss(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
out = run()  # warm-up
gc.collect()
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base = rss("VmRSS")
times, cpu = [], []
for _ in range({repeats}):
    t, c = time.perf_counter(), time.process_time()
    out = run()
    times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
times.sort(); cpu.sort()
out = dict(out or {{}})
out.update(median_s=times[len(times) // 2], cpu_s=cpu[len(cpu) // 2],
           peak_mem_mb=max(rss("VmHWM") - base, 0) / 1024)
print("RESULT" + json.dumps(out))
"""


def isolated(executable: str, case: str, *, repeats: int, timeout: float = 1800, **kw: Any) -> dict[str, Any]:
    """Run one case in a fresh subprocess of ``executable``.

    Like :func:`optlayers.bench.isolated`, but with the interpreter as an argument, so the qpth case
    can run in its own environment; the child imports nothing from optlayers except for the
    optlayers case itself.
    """
    threads = int(os.environ.get("OPTLAYERS_BENCH_THREADS", "1"))
    code = _CHILD.format(root=ROOT, threads=threads, path=HERE, case=case, repeats=repeats)
    proc = subprocess.run([executable, "-c", code, json.dumps(kw)], capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"case {case} {kw} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def _available() -> dict[str, str | None]:
    """The interpreter for each library, or None where it is not installed."""
    exe: dict[str, str | None] = {"optlayers": sys.executable, "cvxpylayers": None, "qpth": None}
    try:
        import cvxpylayers.torch  # noqa: F401

        exe["cvxpylayers"] = sys.executable
    except ImportError:
        pass
    try:
        import qpth  # noqa: F401

        exe["qpth"] = sys.executable
    except ImportError:
        venv_py = os.path.join(QPTH_VENV, "bin", "python")
        if os.path.exists(venv_py):
            exe["qpth"] = venv_py
    return exe


def run(full: bool = False) -> list[dict[str, Any]]:
    """Run every configuration in its own subprocess; returns the table rows."""
    exe = _available()
    configs: list[tuple[str, int, int, int, int, str, list[str]]] = []
    for dtype in ("float64", "float32"):
        libs = ["optlayers", "qpth"] + (["cvxpylayers"] if dtype == "float64" else [])
        configs.append(("batch128_nz50", 128, 50, 50, 10, dtype, libs))
    dtypes = ("float64", "float32") if full else ("float64",)
    extra = ["cvxpylayers"] if full else []
    for dtype in dtypes:
        for B in (32, 512) if full else (32,):
            configs.append((f"scale_batch{B}_nz50", B, 50, 50, 10, dtype, ["optlayers", "qpth"] + extra))
        for nz in (100, 200) if full else ():
            configs.append((f"scale_batch128_nz{nz}", 128, nz, nz, nz // 5, dtype, ["optlayers", "qpth"] + extra))
    if full:
        configs.append(("few_ineq_batch128_nz100_m20", 128, 100, 20, 10, "float64", ["optlayers", "qpth"]))
    rows: list[dict[str, Any]] = []
    for name, B, nz, m, k, dtype, libs in configs:
        reference(B, nz, m, k)
        base = None
        tol = 1e-4 if dtype == "float64" else 1e-2
        for lib in libs:
            row: dict[str, Any] = {"problem": f"{name}_{dtype}", "library": lib}
            if exe[lib] is None:
                hint = " (bash benchmarks/envs/qpth.sh)" if lib == "qpth" else ""
                rows.append({**row, "note": f"skipped: {lib} not installed{hint}"})
                continue
            # More repeats where a call is short (a steadier median on a shared machine); the
            # seconds-long cvxpylayers calls get five at the default size, three beyond it.
            if lib == "cvxpylayers":
                repeats = 5 if B * nz <= 128 * 50 else 3
            else:
                repeats = 15 if B * nz <= 128 * 100 else 5
            try:
                res = isolated(exe[lib], lib, repeats=repeats, B=B, nz=nz, nineq=m, neq=k, dtype=dtype)
            except Exception as err:  # noqa: BLE001 - report the failure in the table and go on
                rows.append({**row, "note": f"failed: {str(err).splitlines()[0][:80]}"})
                continue
            row.update(median_s=res["median_s"], cpu_s=res["cpu_s"], peak_mem_mb=res["peak_mem_mb"],
                       accuracy=res["accuracy"])
            if res["accuracy"] > tol:
                row["note"] = f"solutions disagree (> {tol:g})"
            if lib == "optlayers":
                base = res["median_s"]
            rows.append(row)
        for row in rows:
            if row["problem"] == f"{name}_{dtype}" and base and "median_s" in row:
                row["ratio"] = row["median_s"] / base
    return rows


if __name__ == "__main__":
    from optlayers.bench import format_table

    print(format_table(run(full="--full" in sys.argv)))

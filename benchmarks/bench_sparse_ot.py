"""Sparsity-constrained and quadratically regularized OT: optlayers against POT's ``ot.smooth``.

Problems: uniform weights on two point clouds of ``n = m`` points in the unit square, squared
Euclidean cost scaled to ``max C = 1``, ``γ = 0.1`` (POT's ``reg`` with ``reg_type="l2"``), and
``k = 2`` nonzeros per column for the sparsity-constrained case (POT's ``max_nz``); both the
semi-dual and the dual formulation. Sizes ``n = 500`` (default) and ``n = 500, 2000``
(``--full``).

Common stopping rule ("same tolerance"). POT stops on SciPy's L-BFGS-B test
``Δf <= stopThr · max(|f|, 1)`` per iteration, which at ``stopThr=1e-9`` (its default) leaves an
L1 marginal violation of a few 1e-3 here; optlayers stops on the marginal violation itself
(``tol``, default 1e-9) or, where ``k`` binds (the violation cannot vanish), on its stall test.
So each problem is solved by POT once, and by optlayers both with its defaults and *at POT's
accuracy* — the row the ratios are taken against:

* ``POT ot.smooth (stopThr=1e-9)`` — ``smooth_ot_semi_dual``/``smooth_ot_dual`` with
  ``reg_type="l2"`` (quadratic OT) or ``reg_type="sparsity_constrained", max_nz=k``;
* ``optlayers, POT's accuracy`` — quadratic OT: :func:`optlayers.solvers.sparse_ot.sparse_ot` with
  ``tol`` = the marginal violation POT's plan reached (same accuracy, checked in the
  ``violation`` and ``accuracy`` columns); ``k = 2``: ``DualLBFGS(ftol=1e-9)`` (stall test
  ``Δf <= 1e-9 · max(|f|, max|C| Σa)`` over 10 iterations — at least as strict as POT's per
  iteration test), which reaches POT's dual value or a better one (``accuracy`` column);
* ``optlayers (defaults)`` (``--full`` only: each row is a fresh subprocess, and the default run
  is kept within its CPU budget) — ``tol=1e-9``; for ``k = 2`` the default stall test
  (``ftol=1e-8``).

Columns: ``median_s``; ``ratio`` = time / time of the ``optlayers, POT's accuracy`` row (so
POT's ratio is the speed-up at equal accuracy); ``peak_mem_mb`` (fresh subprocess, growth of the
peak resident set after set-up); ``accuracy`` = relative dual suboptimality ``(D* − D)/D*``
against the best dual value of any row (for quadratic OT, D* is certified: the optlayers plan
meets the marginals to 1e-9 with primal = dual);
``violation`` = ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` of the returned plan; ``objective`` =
``⟨C, P⟩ + γ/2‖P‖²`` of that plan; ``iters`` = iterations (optlayers' dual formulation: semi-dual
warm start plus dual stage).

Also: the projection kernel alone (``--full`` only; ``R = n = 2000``, ``k = 8``: Numba, the
PyTorch reference, POT's ``projection_sparse_simplex``) and the MoE router — one routing call for 4,096 tokens × 64
experts in 16 groups of 256 (float32), :class:`SparseOTRouter` (expert capacity; with ``--full`` also
token sparsity ``k = 1``) against top-1 gating, with the dropped-token fraction as accuracy and the
coefficient of variation of the expert loads.

Run: ``python -m optlayers bench sparse_ot`` or ``python benchmarks/bench_sparse_ot.py [--full]``.
Numba kernels are compiled (or loaded from cache) during set-up, outside the timings. Every case
runs on one thread (``torch.set_num_threads(1)``; NumPy/SciPy single-threaded through the
``*_NUM_THREADS`` variables set for the subprocesses), so the figures compare algorithms, not
thread counts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from typing import Any

import numpy as np
import torch

from optlayers.bench import format_table, isolated

HERE = os.path.abspath(__file__)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children() -> Any:
    """Set the ``*_NUM_THREADS`` variables the measurement subprocesses inherit; restore them after."""
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update({v: "1" for v in THREAD_VARS})
    try:
        yield
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
GAMMA = 0.1
K_SPARSE = 2


def make_problem(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = rng.random((n, 2)), rng.random((n, 2))
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return np.full(n, 1.0 / n), C / C.max()


def _stats(P: np.ndarray, a: np.ndarray, C: np.ndarray, dual: float, iters: int) -> dict[str, Any]:
    viol = float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - a).sum())
    return {"dual": float(dual), "objective": float((C * P).sum() + 0.5 * GAMMA * (P * P).sum()),
            "violation": viol, "iters": int(iters), "max_nnz": int((P > 0).sum(0).max())}


def _warm_up(dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)) -> None:
    from optlayers.solvers.sparse_ot import sparse_ot

    C = torch.rand(100, 80, dtype=torch.float64)  # above the Numba kernels' min_size: they load here
    for form in ("semi_dual", "dual"):
        for k in (2, None):
            for dt in dtypes:
                sparse_ot(None, None, C.to(dt), k=k, gamma=0.1, formulation=form, throw=False)


def case_pot(n: int, formulation: str, k: int | None) -> Any:
    torch.set_num_threads(1)
    import ot

    a, C = make_problem(n)
    fn = ot.smooth.smooth_ot_semi_dual if formulation == "semi_dual" else ot.smooth.smooth_ot_dual

    def run() -> dict[str, Any]:
        with contextlib.redirect_stdout(io.StringIO()):  # POT's sparse projection prints shapes
            P, log = fn(a, a, C, GAMMA, reg_type="l2" if k is None else "sparsity_constrained", max_nz=k,
                        stopThr=1e-9, log=True)
        return _stats(P, a, C, -log["res"].fun, log["res"].nit)

    return run


def case_optlayers(n: int, formulation: str, k: int | None, tol: float = 1e-9, ftol: float | None = None) -> Any:
    torch.set_num_threads(1)
    from optlayers.solvers.sparse_ot import DualLBFGS, sparse_ot

    _warm_up((torch.float64,))
    a, C = make_problem(n)
    Ct = torch.from_numpy(C)

    def run() -> dict[str, Any]:
        r = sparse_ot(None, None, Ct, k=k, gamma=GAMMA, formulation=formulation, tol=tol, throw=False,
                      solver=DualLBFGS(ftol=ftol))
        P = r.aux.plan.to_dense().numpy()
        out = _stats(P, a, C, float(r.aux.value), int(r.iterations))
        out["status"] = int(r.status)
        return out

    return run


def case_kernel(impl: str, n: int = 2000, k: int = 8) -> Any:
    torch.set_num_threads(1)
    from optlayers.kernels import dispatch
    from optlayers.kernels.sparse_simplex import KERNEL_NAME, sparse_simplex_reference, sparse_simplex_to_dense

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    s = torch.full((n,), 1.0 / n, dtype=torch.float64)
    ref = sparse_simplex_to_dense(*sparse_simplex_reference(x, k, s), n).numpy()
    if impl == "pot":
        import ot

        xn = x.numpy()

        def proj() -> Any:
            with contextlib.redirect_stdout(io.StringIO()):  # POT's sparse projection prints shapes
                return ot.utils.projection_sparse_simplex(xn, k, 1.0 / n, axis=1)

        def dense(out: Any) -> np.ndarray:
            return out
    else:
        fn = dispatch(KERNEL_NAME, backend=impl)
        fn(x[:4], k, s[:4])  # compile / load the cache

        def proj() -> Any:
            return fn(x, k, s)

        def dense(out: Any) -> np.ndarray:
            return sparse_simplex_to_dense(*out, n).numpy()

    accuracy = float(np.abs(dense(proj()) - ref).max())  # checked once, outside the measured runs

    def run() -> dict[str, Any]:
        proj()
        return {"accuracy": accuracy}

    return run


def case_router(kind: str, tokens: int = 4096, experts: int = 64, groups: int = 16) -> Any:
    torch.set_num_threads(1)
    from optlayers.layers.sparse_ot import sparse_ot_route, topk_gating

    _warm_up()
    g = torch.Generator().manual_seed(0)
    S = tokens // groups
    logits = torch.randn(groups, S, experts, generator=g) + torch.linspace(0, 1, experts)  # skewed experts
    sparse_ot_route(logits[:2, :32, :8], throw=False)

    def run() -> dict[str, Any]:
        if kind == "topk":
            dispatch, _ = topk_gating(logits, 1, capacity_factor=1.25)
            extra: dict[str, Any] = {}
        else:
            res = sparse_ot_route(logits, capacity_factor=1.25, throw=False,
                                  sparsity="token" if kind == "ot_token" else "expert")
            dispatch, _ = res.solution
            extra = {"iters": int(res.iterations.max()), "violation": float(res.aux.marginal_violation.mean())}
        load = dispatch.sum((1, 3))
        dropped = float((dispatch.sum((2, 3)) == 0).float().mean())
        return {"accuracy": dropped, "load_cv": float((load.std() / load.mean()).mean()), **extra}

    return run


CASES = {"pot": case_pot, "optlayers": case_optlayers, "kernel": case_kernel, "router": case_router}


def run(full: bool = False) -> list[dict[str, Any]]:
    """Run every configuration in its own single-threaded subprocess; returns the table rows."""
    with _single_threaded_children():
        return _run([500, 2000] if full else [500], defaults=full)


KEEP = ("median_s", "peak_mem_mb", "violation", "objective", "iters", "max_nnz", "load_cv")


def run_ot(sizes: list[int], defaults: bool = True) -> list[dict[str, Any]]:
    """The optlayers-vs-POT rows for the given sizes only (single-threaded subprocesses)."""
    with _single_threaded_children():
        return _ot_rows(sizes, defaults)


def _ot_rows(sizes: list[int], defaults: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    keep = KEEP
    for n in sizes:
        for formulation in ("semi_dual", "dual"):
            for k in (None, K_SPARSE):
                problem = (f"{'quadratic' if k is None else f'k={k}'} OT {formulation} n={n}")
                iso = functools.partial(isolated, HERE, timeout=3600)
                pot = iso("pot", repeats=1, n=n, formulation=formulation, k=k)
                if k is None:  # stop at the marginal violation POT reached
                    same = iso("optlayers", repeats=3, n=n, formulation=formulation, k=k,
                               tol=max(pot["violation"], 1e-9))
                else:  # the stricter stall test: POT's dual value or better
                    same = iso("optlayers", repeats=3, n=n, formulation=formulation, k=k, ftol=1e-9)
                block = [{"problem": problem, "library": "optlayers, POT's accuracy", **same},
                         {"problem": problem, "library": "POT ot.smooth (stopThr=1e-9)", **pot}]
                if defaults:
                    ours = iso("optlayers", repeats=3, n=n, formulation=formulation, k=k)
                    block.append({"problem": problem, "library": "optlayers (defaults)", **ours})
                best = max(r["dual"] for r in block)
                base = same["median_s"]
                for r in block:
                    r["accuracy"] = (best - r["dual"]) / abs(best)
                    r["ratio"] = r["median_s"] / base
                    rows.append({c: r[c] for c in ("problem", "library", "ratio", "accuracy", *keep) if c in r})
    return rows


def _run(sizes: list[int], defaults: bool) -> list[dict[str, Any]]:
    rows = _ot_rows(sizes, defaults)
    keep = KEEP
    if defaults:  # --full: the projection kernel alone (a micro-benchmark beside the problems)
        problem = "projection kernel R=n=2000 k=8"
        kern = [("optlayers numba", "numba"), ("optlayers torch reference", "reference"),
                ("POT projection_sparse_simplex", "pot")]
        block = [{"problem": problem, "library": label, **isolated(HERE, "kernel", repeats=5, impl=impl)}
                 for label, impl in kern]
        for r in block:
            r["ratio"] = r["median_s"] / block[0]["median_s"]
        rows += block
    problem = "router 4096 tokens x 64 experts (16 groups)"
    routers = [("optlayers SparseOTRouter (expert capacity)", "ot"), ("top-1 gating", "topk")]
    if defaults:  # --full: also the token-sparse router (each default row costs a fresh subprocess)
        routers.insert(1, ("optlayers SparseOTRouter (token k=1)", "ot_token"))
    block = [{"problem": problem, "library": label, **isolated(HERE, "router", repeats=5, kind=kind)}
             for label, kind in routers]
    for r in block:
        r["ratio"] = r["median_s"] / block[0]["median_s"]
    rows += [{c: r[c] for c in ("problem", "library", "ratio", "accuracy", *keep) if c in r} for r in block]
    return rows


if __name__ == "__main__":
    sys.exit(print(format_table(run(full="--full" in sys.argv))))

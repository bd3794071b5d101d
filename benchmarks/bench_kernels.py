"""Kernel benchmark: reference vs Numba vs compiled (CPU), Triton vs ceilings and competitors (GPU).

CPU (default): for each Sinkhorn kernel (``ot.softmin``, ``ot.kernel_apply``) through the
dispatch, the PyTorch reference (eager fast path), Numba, and — for the soft-min — a
``torch.compile``d fused log-sum-exp (Inductor; guarded: if compiling fails the row says so), in
ns per cost entry at ``n = m = 1000, 4000``, ``d = 2``, float32/float64, one thread, process CPU
time (robust to other tenants). Also the k-sparse simplex projection through the dispatch.

GPU (``--device cuda``, needs a CUDA card; nothing here is measured without one): the Triton
soft-min's throughput against the two ceilings measured on the same card — a large
device-to-device copy (bytes/s, converted to cost entries/s for a stored cost) and ``torch.exp``
over a large tensor (entries/s) — and against GeomLoss/KeOps (online) and FlashSinkhorn
(``flash-sinkhorn``) when importable; end-to-end Sinkhorn (online point clouds, ε = 0.01,
float32) up to ``n = 10⁵`` and the time per iteration at ``n = 10⁶`` (``max_iter=3``,
``check_every=None``). The card is recorded in every row.

    python benchmarks/bench_kernels.py                 # CPU
    python benchmarks/bench_kernels.py --device cuda   # GPU
    python -m optlayers bench kernels
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _time(fn: Any, min_reps: int = 3, budget_s: float = 2.0, cuda: bool = False) -> float:
    """Median seconds per call (process CPU time on CPU, synchronized wall time on CUDA)."""
    clock = time.perf_counter if cuda else time.process_time
    fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    times.sort()
    return times[len(times) // 2]


def _fused_lse(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    d2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    z = (h[:, None, :] - d2) / eps[:, None, None]
    return -eps[:, None] * torch.logsumexp(z, -1)


def _problem(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, n, 2, generator=g, dtype=torch.float64).to(dtype).to(device)
    y = (0.5 + 0.15 * torch.randn(1, n, 2, generator=g, dtype=torch.float64)).to(dtype).to(device)
    h = (0.01 * torch.randn(1, n, generator=g, dtype=torch.float64)).to(dtype).to(device)
    eps = torch.full((1,), 0.01, dtype=dtype, device=device)
    return x, y, h, eps


def run_cpu(full: bool = False) -> list[dict[str, Any]]:
    from optlayers.kernels import backend_available, dispatch
    from optlayers.kernels.softmin import KERNEL_APPLY, SOFTMIN
    from optlayers.kernels.softmin_reference import SqEuclideanSource, softmin_reference

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:
        pass
    rows: list[dict[str, Any]] = []
    compiled: Any = None
    compile_note = ""
    try:
        compiled = torch.compile(_fused_lse, dynamic=False, fullgraph=True)
    except Exception as exc:  # noqa: BLE001
        compile_note = f"torch.compile unavailable: {exc}"
    sizes = (1000, 4000, 8000) if full else (1000, 4000)
    for dtype in (torch.float32, torch.float64):
        for n in sizes:
            x, y, h, eps = _problem(n, dtype, "cpu")
            src = SqEuclideanSource(x, y)
            ref = softmin_reference(src, h, eps)
            v = torch.randn(1, n, 3, dtype=dtype)
            al, be = torch.zeros(1, n, dtype=dtype), torch.log(torch.full((1, n), 1.0 / n, dtype=dtype))
            cands: list[tuple[str, str, Any]] = [("ot.softmin", "reference", None),
                                                 ("ot.kernel_apply", "reference", None)]
            if backend_available("numba"):
                cands += [("ot.softmin", "numba", None), ("ot.kernel_apply", "numba", None)]
            cands.append(("ot.softmin", "torch.compile", compiled))
            base: dict[str, float] = {}
            for kernel, lib, fn in cands:
                row: dict[str, Any] = {"problem": f"{kernel} n=m={n} d=2 {str(dtype)[6:]}", "library": lib}
                if lib == "torch.compile":
                    if fn is None:
                        row.update(median_s=float("nan"), note=compile_note)
                        rows.append(row)
                        continue
                    t0 = time.perf_counter()
                    try:
                        out = fn(x, y, h, eps)
                    except Exception as exc:  # noqa: BLE001 - recorded, the reference stays
                        row.update(median_s=float("nan"), note=f"compile failed: {type(exc).__name__}")
                        rows.append(row)
                        compiled = None
                        continue
                    row["compile_s"] = time.perf_counter() - t0
                    call = (lambda fn=fn: fn(x, y, h, eps))  # noqa: E731
                elif kernel == "ot.softmin":
                    k = dispatch(SOFTMIN, backend=lib)
                    out = k(src, h, eps)
                    call = (lambda k=k: k(src, h, eps))  # noqa: E731
                else:
                    k = dispatch(KERNEL_APPLY, backend=lib)
                    out = k(src, al, be, eps, v)
                    call = (lambda k=k: k(src, al, be, eps, v))  # noqa: E731
                t = _time(call)
                row["median_s"] = t
                row["ns_per_entry"] = 1e9 * t / (n * n)
                if kernel == "ot.softmin":
                    row["accuracy"] = float((out - ref).abs().max())
                base.setdefault(kernel, t)
                row["ratio"] = t / base[kernel]
                rows.append(row)
    rows += _sparse_simplex_rows()
    return rows


def _sparse_simplex_rows() -> list[dict[str, Any]]:
    """The k-sparse simplex projection through the dispatch (reference vs Numba)."""
    try:
        from optlayers.kernels import backend_available, dispatch
        from optlayers.kernels.sparse_simplex import KERNEL_NAME
    except ImportError:
        return []
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=g)
    s = torch.ones(4096)
    base = None
    for lib in ("reference", "numba"):
        if lib == "numba" and not backend_available("numba"):
            continue
        fn = dispatch(KERNEL_NAME, backend=lib)
        t = _time(lambda fn=fn: fn(x, 16, s))
        base = base or t
        rows.append({"problem": "sparse_simplex R=4096 n=512 k=16 float32", "library": lib, "median_s": t,
                     "ratio": t / base, "ns_per_entry": 1e9 * t / x.numel()})
    return rows


def run_cuda(full: bool = False) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing was measured")
    from optlayers.kernels import dispatch
    from optlayers.kernels.softmin import SOFTMIN
    from optlayers.kernels.softmin_reference import SqEuclideanSource, softmin_reference
    from optlayers.solvers.ot import PointCloud, sinkhorn

    card = torch.cuda.get_device_name()
    rows: list[dict[str, Any]] = []
    # ceilings measured on this card
    big = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(big)
    t_copy = _time(lambda: dst.copy_(big), cuda=True)
    copy_bps = 2 * big.numel() * 4 / t_copy
    t_exp = _time(lambda: torch.exp(big, out=dst), cuda=True)
    exp_eps = big.numel() / t_exp
    big = dst = torch.empty(0, device="cuda")  # release the ceiling buffers
    rows.append({"problem": "ceiling: device copy", "library": "torch", "median_s": t_copy,
                 "GBps": copy_bps / 1e9, "card": card})
    rows.append({"problem": "ceiling: exp", "library": "torch", "median_s": t_exp,
                 "Gentries_per_s": exp_eps / 1e9, "card": card})
    for n in (10_000, 30_000, 100_000):
        x, y, h, eps = _problem(n, torch.float32, "cuda")
        src = SqEuclideanSource(x, y)
        fn = dispatch(SOFTMIN, backend="triton", device="cuda")
        t = _time(lambda fn=fn: fn(src, h, eps), cuda=True)
        eps_rate = n * n / t
        row: dict[str, Any] = {"problem": f"softmin n=m={n} d=2 float32", "library": "optlayers triton",
                               "median_s": t, "Gentries_per_s": eps_rate / 1e9,
                               "frac_exp_ceiling": eps_rate / exp_eps,
                               "frac_copy_ceiling(stored fp32 cost)": eps_rate * 4 / copy_bps, "card": card}
        if n <= 30_000:
            row["accuracy"] = float((fn(src, h, eps) - softmin_reference(src, h, eps)).abs().max())
        rows.append(row)
        try:  # GeomLoss / KeOps online soft-min
            from geomloss.sinkhorn_samples import softmin_online  # type: ignore[import-not-found]
            from pykeops.torch import LazyTensor  # noqa: F401  # type: ignore[import-not-found]

            xs, ys = x[0].contiguous(), y[0].contiguous()

            def keops() -> torch.Tensor:
                return softmin_online(0.01, (xs, ys), h[0].contiguous(), p=2)

            rows.append({"problem": row["problem"], "library": "GeomLoss/KeOps online",
                         "median_s": _time(keops, cuda=True), "card": card})
        except Exception as exc:  # noqa: BLE001
            rows.append({"problem": row["problem"], "library": "GeomLoss/KeOps online", "median_s": float("nan"),
                         "note": f"not run: {type(exc).__name__}", "card": card})
        try:
            import flash_sinkhorn  # type: ignore[import-not-found]  # noqa: F401

            rows.append({"problem": row["problem"], "library": "flash-sinkhorn", "median_s": float("nan"),
                         "note": "installed; wire its soft-min entry point here", "card": card})
        except ImportError:
            rows.append({"problem": row["problem"], "library": "flash-sinkhorn", "median_s": float("nan"),
                         "note": "not installed", "card": card})
    # end-to-end Sinkhorn, online geometry
    for n in ((10_000, 30_000, 100_000) if full else (10_000, 30_000)):
        x, y, _, _ = _problem(n, torch.float32, "cuda")
        a = torch.full((n,), 1.0 / n, device="cuda")

        def solve(x: torch.Tensor = x, y: torch.Tensor = y, a: torch.Tensor = a) -> Any:
            return sinkhorn(a, a, PointCloud(x[0], y[0], online=True), epsilon=0.01, max_iter=10_000, throw=False)

        t = _time(solve, min_reps=1, budget_s=0.0, cuda=True)
        res = solve()
        rows.append({"problem": f"sinkhorn end-to-end n=m={n} eps=0.01 float32", "library": "optlayers triton",
                     "median_s": t, "iterations": int(res.iterations), "accuracy": float(res.residual), "card": card})
    n = 1_000_000
    x, y, _, _ = _problem(n, torch.float32, "cuda")
    a = torch.full((n,), 1.0 / n, device="cuda")

    def three() -> Any:
        return sinkhorn(a, a, PointCloud(x[0], y[0], online=True), epsilon=0.01, max_iter=3, check_every=None,
                        throw=False)

    t = _time(three, min_reps=1, budget_s=0.0, cuda=True)
    rows.append({"problem": "sinkhorn n=m=1e6, time per iteration", "library": "optlayers triton",
                 "median_s": t / 3, "card": card})
    return rows


def run(full: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Rows for ``python -m optlayers bench kernels``."""
    return run_cuda(full) if device.startswith("cuda") else run_cpu(full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = run(args.full, args.device)
    for r in rows:
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    print("load average:", os.getloadavg())
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Kernel benchmark: reference vs Numba vs compiled (CPU), Triton vs ceilings and competitors (GPU).

CPU (default): for each Sinkhorn kernel (``ot.softmin``, ``ot.kernel_apply``) through the
dispatch, the PyTorch reference (eager fast path), Numba, and a ``torch.compile``d fused version
(Inductor; guarded: if compiling fails the row says so; its first-call CPU time per shape is
reported as ``compile_first_s``), in ns per cost entry at ``n = m = 200, 1000, 4000`` (``8000``
with ``--full``), ``d = 2``, float32/float64, one thread, process CPU time (robust to other
tenants). Then the k-sparse simplex projection, and the other Numba kernels (DRO sort/scan,
χ²-ball, PAV; sparse projection; sparse-OT dual) at a small and a mid size against their
references, with the size from which automatic dispatch picks Numba and the backend it picks.
The decisions drawn from these numbers are in :mod:`optlayers.kernels.softmin`.

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
    bash benchmarks/envs/gpu.sh download   # here (network): the GPU competitors as wheels
    bash benchmarks/envs/gpu.sh run        # on the GPU machine (no network needed)
"""

from __future__ import annotations

import argparse
import json
import math
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


def _problem(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, n, 2, generator=g, dtype=torch.float64).to(dtype).to(device)
    y = (0.5 + 0.15 * torch.randn(1, n, 2, generator=g, dtype=torch.float64)).to(dtype).to(device)
    h = (0.01 * torch.randn(1, n, generator=g, dtype=torch.float64)).to(dtype).to(device)
    eps = torch.full((1,), 0.01, dtype=dtype, device=device)
    return x, y, h, eps


def run_cpu(full: bool = False) -> list[dict[str, Any]]:
    """Soft-min and transport-apply: reference vs Numba vs torch.compile; then the other Numba kernels.

    ``compile_first_s`` is the CPU time of the compiled function's first call for that shape
    (the first one in the process includes Dynamo/Inductor start-up); it is not in ``median_s``.
    """
    from optlayers.kernels import KernelUnavailableError, backend_available, dispatch
    from optlayers.kernels.softmin import KERNEL_APPLY, SOFTMIN
    from optlayers.kernels.softmin_reference import SqEuclideanSource, softmin_reference

    try:
        import numba

        numba.set_num_threads(1)  # starts Numba's threading layer, which may reset PyTorch's count:
    except ImportError:
        pass
    torch.set_num_threads(1)  # so PyTorch's is set afterwards
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}  # kernel -> why the compiled backend failed (tried once)
    sizes = (200, 1000, 4000, 8000) if full else (200, 1000, 4000)
    for dtype in (torch.float32, torch.float64):
        for n in sizes:
            x, y, h, eps = _problem(n, dtype, "cpu")
            src = SqEuclideanSource(x, y)
            ref = softmin_reference(src, h, eps)
            v = torch.randn(1, n, 3, dtype=dtype)
            al, be = torch.zeros(1, n, dtype=dtype), torch.log(torch.full((1, n), 1.0 / n, dtype=dtype))
            libs = ["reference"] + (["numba"] if backend_available("numba") else []) + ["compiled"]
            for kernel in (SOFTMIN, KERNEL_APPLY):
                base = None
                for lib in libs:
                    row: dict[str, Any] = {"problem": f"{kernel} n=m={n} d=2 {str(dtype)[6:]}",
                                           "library": "torch.compile (backend compiled)" if lib == "compiled" else lib}
                    fn = dispatch(kernel, backend=lib)
                    args = (src, h, eps) if kernel == SOFTMIN else (src, al, be, eps, v)
                    if lib == "compiled":
                        if kernel in failed:
                            rows.append({**row, "median_s": float("nan"), "note": failed[kernel]})
                            continue
                        t0 = time.process_time()
                        try:
                            out = fn(*args)
                        except KernelUnavailableError as exc:  # recorded; the reference stays
                            failed[kernel] = str(exc)[:120]
                            rows.append({**row, "median_s": float("nan"), "note": failed[kernel]})
                            continue
                        row["compile_first_s"] = time.process_time() - t0
                    else:
                        out = fn(*args)
                    t = _time(lambda fn=fn, args=args: fn(*args), budget_s=0.5)
                    row["median_s"] = t
                    row["ns_per_entry"] = 1e9 * t / (n * n)
                    if kernel == SOFTMIN:
                        row["accuracy"] = float((out - ref).abs().max())
                    base = base or t
                    row["ratio"] = t / base
                    rows.append(row)
    rows += _sparse_simplex_rows()
    rows += _numba_crossover_rows()
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


def _numba_crossover_rows() -> list[dict[str, Any]]:
    """The other Numba kernels at a small and a mid size against their references, with the size
    from which automatic dispatch picks Numba (``auto_from``): shows whether that threshold sits
    where Numba starts to win."""
    from optlayers.kernels import backend_available, dispatch
    from optlayers.kernels._dispatch import _REGISTRY, Backend

    if not backend_available("numba"):
        return []
    try:
        import optlayers.solvers.dro.chi_square
        import optlayers.solvers.dro.cvar
        import optlayers.solvers.dro.spectral  # noqa: F401  (they register the DRO kernels)
        from optlayers.kernels.sparse_ot_dual import DUAL_KERNEL_NAME
        from optlayers.kernels.sparse_simplex import KERNEL_NAME
    except ImportError:
        return []
    g = torch.Generator().manual_seed(0)

    def losses(B: int, n: int) -> torch.Tensor:
        return torch.randn(B, n, generator=g, dtype=torch.float64)

    def perm(B: int, n: int) -> tuple[Any, ...]:
        w = torch.sort(torch.rand(n, generator=g, dtype=torch.float64), descending=True).values
        return losses(B, n), w / w.sum()

    def dual(B: int, n: int) -> tuple[Any, ...]:
        K = torch.rand(B, n, n, generator=g, dtype=torch.float64)
        return torch.zeros(B, n, dtype=torch.float64), torch.full((B, n), 0.5, dtype=torch.float64), K, 4

    cases: list[tuple[str, Any, tuple[tuple[int, int, int], ...]]] = [
        # (kernel, make(B, n) -> args, ((B, n, dispatch size), ...))
        ("dro.cvar", lambda B, n: (losses(B, n), 0.1), ((1, 64, 64), (1, 4096, 4096))),
        ("dro.chi2_ball", lambda B, n: (losses(B, n), 1.0), ((1, 64, 64), (1, 4096, 4096))),
        ("dro.perm_proj_l2", perm, ((1, 64, 64), (1, 4096, 4096))),
        ("dro.perm_proj_kl", perm, ((1, 64, 64), (1, 4096, 4096))),
        (KERNEL_NAME, lambda B, n: (torch.randn(B, n, generator=g), 16, torch.ones(B)),
         ((4, 512, 2048), (64, 512, 32768))),
        (DUAL_KERNEL_NAME, dual, ((1, 32, 1024), (1, 128, 16384))),
    ]
    rows: list[dict[str, Any]] = []
    for kernel, make, shapes in cases:
        entry = _REGISTRY.get(kernel, {}).get(Backend.NUMBA)
        for B, n, size in shapes:
            args = make(B, n)
            times: dict[str, float] = {}
            for lib in ("reference", "numba"):
                f = dispatch(kernel, backend=lib)
                times[lib] = _time(lambda f=f, a=args: f(*a), budget_s=0.3)
            for lib, t in times.items():
                rows.append({"problem": f"{kernel} B={B} n={n} (dispatch size {size})", "library": lib,
                             "median_s": t, "ratio": t / times["reference"],
                             "auto_from": None if entry is None else entry.min_size,
                             "auto_picks": dispatch(kernel, size=size).backend.value})  # type: ignore[attr-defined]
    return rows

# ------------------------------------------------------------------ competitors' soft-min (GPU)
# Our soft-min: f_i = −ε log Σ_j exp((h_j − ‖x_i − y_j‖²)/ε) for x (n, d), y (m, d), h (m,).


def geomloss_inputs(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments of GeomLoss's ``softmin_online_lazytensor(eps, (x', y'), h', p=2)`` giving our soft-min.

    GeomLoss computes ``−ε log Σ_j exp(h'_j − ‖x'_i − y'_j‖²/(2ε))`` on batched ``(1, n, d)``
    clouds: with ``x' = √2 x``, ``y' = √2 y`` and ``h' = h/ε`` that is our ``f``.
    """
    r = math.sqrt(2.0)
    return (r * x)[None].contiguous(), (r * y)[None].contiguous(), (h / eps)[None].contiguous()


def flash_bias(y: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """FlashSinkhorn's pre-scaled bias for our soft-min (``cost_scale = 1``).

    ``flashsinkhorn_lse(x, y, bias, eps)`` returns the shifted potential
    ``f̂_i = −ε log Σ_j exp(2 x_i·y_j/ε + bias_j)``; since ``‖x_i − y_j‖² = ‖x_i‖² + ‖y_j‖² − 2 x_i·y_j``,
    ``bias_j = (h_j − ‖y_j‖²)/ε`` gives ``f_i = f̂_i + ‖x_i‖²`` (:func:`flash_unshift`).
    """
    return ((h - (y * y).sum(-1)) / eps).contiguous()


def flash_unshift(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Our soft-min from FlashSinkhorn's shifted potential: ``f_i = f̂_i + ‖x_i‖²``."""
    return out + (x * x).sum(-1)


def _competitor_softmins(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                         eps: float) -> list[tuple[str, Any, str]]:
    """``(library, call or None, note)``: each call returns our soft-min ``(n,)`` computed by a competitor."""
    out: list[tuple[str, Any, str]] = []
    try:  # GeomLoss >= 0.3 keeps the online soft-min in geomloss._legacy; 0.2.x in geomloss
        try:
            from geomloss._legacy.sinkhorn_samples import (  # type: ignore[import-not-found]
                softmin_online_lazytensor,
            )
        except ImportError:
            from geomloss.sinkhorn_samples import softmin_online_lazytensor  # type: ignore[import-not-found]
        import pykeops.torch  # type: ignore[import-not-found]  # noqa: F401

        gx, gy, gh = geomloss_inputs(x, y, h, eps)
        out.append(("GeomLoss/KeOps online",
                     lambda: softmin_online_lazytensor(eps, (gx, gy), gh, p=2)[0], ""))
    except Exception as exc:  # noqa: BLE001
        out.append(("GeomLoss/KeOps online", None, f"not run: {type(exc).__name__}: {str(exc)[:160]}"))
    try:
        from flash_sinkhorn.kernels.sinkhorn_flashstyle_sqeuclid import (  # type: ignore[import-not-found]
            flashsinkhorn_lse,
        )

        xc, yc, bias = x.contiguous(), y.contiguous(), flash_bias(y, h, eps)
        for tf32 in (False, True):
            out.append((f"flash-sinkhorn ({'tf32, its default' if tf32 else 'fp32 dots'})",
                        lambda tf32=tf32: flash_unshift(flashsinkhorn_lse(xc, yc, bias, eps, cost_scale=1.0,
                                                                          allow_tf32=tf32), xc),
                        "flashsinkhorn_lse (autotuned), output unshifted by ||x||^2"))
    except Exception as exc:  # noqa: BLE001
        out.append(("flash-sinkhorn", None, f"not run: {type(exc).__name__}: {str(exc)[:160]}"))
    return out


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
        ref64 = None
        if n <= 30_000:  # float64 reference on the card (blockwise, no n x m temporary)
            ref64 = softmin_reference(SqEuclideanSource(x.double(), y.double()), h.double(), eps.double())[0]
            row["accuracy_vs_float64_reference"] = float((fn(src, h, eps)[0].double() - ref64).abs().max())
        rows.append(row)
        for lib, call, note in _competitor_softmins(x[0], y[0], h[0], float(eps[0])):
            crow: dict[str, Any] = {"problem": row["problem"], "library": lib, "card": card}
            if call is None:
                crow.update(median_s=float("nan"), note=note)
                rows.append(crow)
                continue
            try:
                out = call()  # first call: KeOps compiles, Triton autotunes (not timed)
                torch.cuda.synchronize()
                tc = _time(call, cuda=True)
            except Exception as exc:  # noqa: BLE001 - recorded, the other rows stay
                crow.update(median_s=float("nan"), note=f"not run: {type(exc).__name__}: {str(exc)[:160]}")
                rows.append(crow)
                continue
            crow.update(median_s=tc, Gentries_per_s=n * n / tc / 1e9, frac_exp_ceiling=n * n / tc / exp_eps,
                        ratio_vs_optlayers=tc / t)
            if ref64 is not None:
                crow["accuracy_vs_float64_reference"] = float((out.reshape(-1).double() - ref64).abs().max())
            if note:
                crow["note"] = note
            rows.append(crow)
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

"""The benchmark runner behind ``python -m optlayers bench``.

Suites are the ``benchmarks/bench_<suite>.py`` files of a source checkout (searched in the
current directory, then next to the package). Each exposes ``run(full=False, device="cpu")``
returning rows ``{problem, library, median_s, ratio, peak_mem_mb, accuracy}`` (extra keys are
kept). The runner prints one table per suite and writes JSON naming the machine and versions.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_bench", "find_suites", "format_table", "machine_info"]


def find_suites() -> dict[str, Path]:
    """Map suite names to their files."""
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"]
    for folder in candidates:
        if folder.is_dir():
            return {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}
    return {}


def machine_info(device: str) -> dict[str, Any]:
    """The machine, device and library versions a result was measured with."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["processor"]
        info["cores"] = len(names)
    except OSError:
        info["cpu"] = info["processor"]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("numpy", "scipy", "numba", "ot", "cvxpy", "cvxpylayers", "geomloss", "torchopt", "cooper"):
        try:
            mod = __import__(lib)
            info[f"version_{lib}"] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent competitors are simply not listed
            pass
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of benchmark rows."""
    cols = ["problem", "library", "median_s", "ratio", "peak_mem_mb", "accuracy"]
    extra = sorted({k for r in rows for k in r} - set(cols) - {"note"})
    cols += extra + (["note"] if any("note" in r for r in rows) else [])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def run_bench(suites: list[str], *, full: bool = False, device: str = "cpu",
              json_path: str = "benchmark-results.json", list_only: bool = False) -> int:
    """Run benchmark suites; returns a process exit code."""
    available = find_suites()
    if list_only or not available:
        if not available:
            print("no benchmarks/ folder found: run from a source checkout of optlayers")
            return 1
        print("suites:", ", ".join(available))
        return 0
    unknown = [s for s in suites if s not in available]
    if unknown:
        print(f"unknown suite(s) {unknown}; valid: {sorted(available)}")
        return 2
    results: dict[str, Any] = {"machine": machine_info(device), "suites": {}, "wall_s": {}}
    failed = []
    for name in suites or list(available):
        spec = importlib.util.spec_from_file_location(f"optlayers_bench_{name}", available[name])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kwargs: dict[str, Any] = {"full": full}
        if "device" in inspect.signature(module.run).parameters:
            kwargs["device"] = device
        print(f"\n## {name}")
        start = time.perf_counter()
        try:
            rows = module.run(**kwargs)
        except Exception as err:  # noqa: BLE001 - report and continue with the next suite
            print(f"suite {name} failed: {type(err).__name__}: {err}")
            failed.append(name)
            continue
        elapsed = time.perf_counter() - start
        print(format_table(rows))
        print(f"({name}: {elapsed:.0f} s wall)")
        results["suites"][name] = rows
        results["wall_s"][name] = elapsed
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    total = sum(results["wall_s"].values())
    print(f"\n{len(results['wall_s'])} suite(s) in {total / 60:.1f} min; results written to {json_path}")
    return 1 if failed else 0


def time_median(fn: Any, repeats: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs (after ``warmup``); returns (seconds, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def rss_kb(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status, in kB (VmRSS now, VmHWM peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (VmHWM) to the current one (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def isolated(path: str, case: str, *, repeats: int = 5, timeout: float = 1200, **kwargs: Any) -> dict[str, Any]:
    """Measure one configuration in a fresh subprocess: median time and peak memory.

    The benchmark file defines ``CASES[case](**kwargs) -> run`` (set-up done, returns a callable
    that performs the measured work and returns a dict of extra fields, e.g. accuracy). Peak
    memory is the growth of the child's peak resident set over its value after set-up.
    """
    import subprocess

    code = (
        "import json, resource, sys, importlib.util\n"
        "from optlayers.bench import time_median\n"
        f"spec = importlib.util.spec_from_file_location('bench_case', {path!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"run = mod.CASES[{case!r}](**json.loads(sys.argv[1]))\n"
        "import gc; gc.collect()\n"
        "from optlayers.bench import reset_peak_rss, rss_kb\n"
        "import torch; torch.func.vjp(torch.func.grad(lambda x: (x * x).sum()), torch.ones(2))  # lazy imports\n"
        "import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)  # return freed set-up memory to the OS\n"
        "reset_peak_rss(); base = rss_kb('VmRSS')\n"
        f"t, out = time_median(run, repeats={repeats}, warmup=0)\n"
        "peak = rss_kb('VmHWM')\n"
        "out = dict(out or {}); out.update(median_s=t, peak_mem_mb=max(peak - base, 0) / 1024)\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"benchmark case {case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")

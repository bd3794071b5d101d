"""``python -m optlayers demo``: a tour of optlayers on real data, each stage checked.

Every stage solves a short, real problem, shows progress, and returns a :class:`StageResult`
saying what was solved, the result, and the check that it is right. The tour writes a Markdown
report (tables and PNG figures) to ``--out`` and exits non-zero if any check fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path

import torch

__all__ = ["StageResult", "run_demo", "STAGES"]

# stage name -> module (each module defines ``run(quick: bool, out: Path) -> StageResult``)
STAGES: dict[str, str] = {
    "hypergradients": "optlayers.demo.hypergradients",
    "qp": "optlayers.demo.qp",
    "ot": "optlayers.demo.ot",
    "dro": "optlayers.demo.dro",
    "constrained": "optlayers.demo.constrained",
    "physics": "optlayers.demo.physics",
}


@dataclasses.dataclass
class StageResult:
    """What a stage did and whether its check passed."""

    name: str
    solved: str
    result: str
    check: str
    passed: bool
    figures: list[str] = dataclasses.field(default_factory=list)
    table: str = ""
    seconds: float = 0.0


def run_demo(*, quick: bool = False, out: str = "optlayers-demo", stages: list[str] | None = None) -> int:
    """Run the tour (or the named stages); returns a process exit code."""
    names = stages or list(STAGES)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        print(f"unknown stage(s) {unknown}; valid stages: {list(STAGES)}")
        return 2
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    threads = torch.get_num_threads()
    # every stage solves many small problems: intra-op threads only add overhead (and thrash a
    # busy machine), so the tour runs on one thread and restores the setting afterwards
    torch.set_num_threads(1)
    try:
        for name in names:
            results.append(_run_stage(name, quick, folder))
    finally:
        torch.set_num_threads(threads)
    summary = _summary(results)
    print("\n" + summary)
    _write_report(folder, results, summary, quick)
    print(f"\nreport: {folder / 'report.md'}")
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"\nFAILED checks in stage(s): {', '.join(failed)}")
        return 1
    return 0


def _run_stage(name: str, quick: bool, folder: Path) -> StageResult:
    print(f"\n=== stage: {name} ===", flush=True)
    start = time.perf_counter()
    try:
        res: StageResult = importlib.import_module(STAGES[name]).run(quick=quick, out=folder)
    except Exception as err:  # noqa: BLE001 - a crashing stage is a failed check, reported as such
        res = StageResult(name, "(crashed)", f"{type(err).__name__}: {err}", "stage ran to completion", False)
    res.seconds = time.perf_counter() - start
    print(f"{'PASS' if res.passed else 'FAIL'}: {res.check}  ({res.seconds:.1f} s)", flush=True)
    return res


def _summary(results: list[StageResult]) -> str:
    rows = [("stage", "what was solved", "result", "check", "ok", "time")]
    rows += [(r.name, r.solved, r.result, r.check, "yes" if r.passed else "NO", f"{r.seconds:.1f}s") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _write_report(folder: Path, results: list[StageResult], summary: str, quick: bool) -> None:
    parts = ["# optlayers demo report", "", f"Mode: {'quick' if quick else 'full'}.", "", summary, ""]
    for r in results:
        parts += [f"## {r.name}", "", f"**Solved:** {r.solved}", "", f"**Result:** {r.result}", "",
                  f"**Check:** {r.check} — {'passed' if r.passed else 'FAILED'}", ""]
        if r.table:
            parts += ["```", r.table, "```", ""]
        parts += [f"![{r.name}]({fig})" for fig in r.figures] + [""]
    (folder / "report.md").write_text("\n".join(parts))


def progress(iterable, desc: str = ""):  # type: ignore[no-untyped-def]
    """A tqdm progress bar when tqdm is installed, else the iterable unchanged."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)

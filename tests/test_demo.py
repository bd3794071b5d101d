"""``python -m optlayers demo --quick`` runs in the test suite and writes its report."""

import re
import subprocess
import sys

from optlayers.demo import STAGES

ISSUE_ORDER = ["hypergradients", "qp", "ot", "dro", "constrained", "physics"]


def _demo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "optlayers", "demo", *args], capture_output=True, text=True,
                          timeout=timeout)


def _summary_rows(report):
    """{stage: cells} from the summary table at the top of report.md."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in STAGES:
            rows[cells[0]] = cells
    return rows


def test_stages_in_issue_order():
    assert list(STAGES) == ISSUE_ORDER


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = _demo("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    rows = _summary_rows(report)
    assert list(rows) == ISSUE_ORDER
    for name, cells in rows.items():
        # stage | what was solved | result | check | ok | time
        assert len(cells) == 6 and all(cells[1:4]), cells
        assert cells[1] != "(crashed)" and cells[4] == "yes", cells
        assert f"## {name}" in report
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) >= len(ISSUE_ORDER)
    for fig in figures:
        png = out / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000, (fig, png.stat().st_size)


def test_demo_single_stage(tmp_path):
    out = tmp_path / "one"
    proc = _demo("--quick", "--stage", "constrained", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(_summary_rows((out / "report.md").read_text())) == ["constrained"]
    assert sorted(p.name for p in out.glob("*.png")) == ["constrained.png"]


def test_demo_unknown_stage_lists_valid_ones():
    proc = _demo("--stage", "nope", timeout=120)
    assert proc.returncode != 0 and all(name in proc.stdout for name in ISSUE_ORDER)

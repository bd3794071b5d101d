"""``python -m optlayers demo --quick`` runs in the test suite and writes its report."""

import subprocess
import sys


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "optlayers", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "hypergradients" in report
    for png in out.glob("*.png"):
        assert png.stat().st_size > 1000


def test_demo_unknown_stage_lists_valid_ones():
    proc = subprocess.run([sys.executable, "-m", "optlayers", "demo", "--stage", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "hypergradients" in proc.stdout

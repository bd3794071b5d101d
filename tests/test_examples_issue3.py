"""The issue-3 examples at ``--quick`` size, each in a subprocess: exit code, promised property, plot.

The selected examples are launched together when the first of these tests runs (they are
single-threaded, so on a multi-core machine they overlap); each test then waits for its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("hyperparameter_gradients", "data_hypercleaning", "deq_classifier")
TIMEOUT = 300


@pytest.fixture(scope="module")
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Start every selected example once (``--quick --out tmp``); map name -> (process, out dir)."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    procs: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    for name in EXAMPLES:
        if not any(name in test for test in selected):
            continue
        out = tmp_path_factory.mktemp(name)
        proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        procs[name] = (proc, out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def result_of(launched: Any, name: str) -> dict[str, Any]:
    """Wait for ``name``; check exit code 0, the PNG, and parse its final ``RESULT {json}`` line."""
    proc, out = launched[name]
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"{name} printed no RESULT line:\n{stdout[-3000:]}"
    png = out / f"{name}.png"
    assert png.is_file() and png.stat().st_size > 0, f"{name} saved no plot at {png}"
    return json.loads(lines[-1][len("RESULT "):])


def test_hyperparameter_gradients_beats_grid_search(launched: Any) -> None:
    r = result_of(launched, "hyperparameter_gradients")
    assert r["hgd_val_loss"] < r["grid_best_val_loss"]
    assert r["hgd_val_loss_converged"] < r["grid_best_val_loss"]  # not an early-stopping effect
    # the grid search was offered the whole budget of hypergradient descent (inner steps + adjoint HVPs)
    assert r["grid_budget_used"] <= r["budget_grad_evals"]
    assert r["passed"]


def test_data_hypercleaning_finds_corrupted_labels(launched: Any) -> None:
    r = result_of(launched, "data_hypercleaning")
    assert r["precision_at_rate"] >= 0.8
    assert r["mean_weight_corrupt"] < r["mean_weight_clean"]
    assert r["test_acc_learned"] > r["test_acc_uniform"]


def test_deq_classifier_on_digits(launched: Any) -> None:
    r = result_of(launched, "deq_classifier")
    assert r["test_acc"] >= 0.85
    assert 1 <= r["mean_iters_per_batch"] <= r["max_iters"] <= 100

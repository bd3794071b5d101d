"""The issue-3 examples at ``--quick`` size, each in a subprocess: exit code, promised property, plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"{name} printed no RESULT line:\n{proc.stdout[-3000:]}"
    assert (out / f"{name}.png").stat().st_size > 0
    return json.loads(lines[-1][len("RESULT "):])


def test_hyperparameter_gradients_beat_grid_search(tmp_path: Path) -> None:
    r = run_example("hyperparameter_gradients", tmp_path)
    assert r["hgd_val_loss"] < r["grid_best_val_loss"]
    assert r["hgd_val_loss_converged"] < r["grid_best_val_loss"]
    # the grid search was given the whole budget of hypergradient descent (inner steps + adjoint HVPs)
    assert r["grid_budget_used"] <= r["budget_grad_evals"]
    assert r["passed"]


def test_data_hypercleaning_finds_corrupted_labels(tmp_path: Path) -> None:
    r = run_example("data_hypercleaning", tmp_path)
    assert r["precision_at_rate"] >= 0.8
    assert r["mean_weight_corrupt"] < r["mean_weight_clean"]
    assert r["test_acc_learned"] > r["test_acc_uniform"]


def test_deq_classifier_on_digits(tmp_path: Path) -> None:
    r = run_example("deq_classifier", tmp_path)
    assert r["test_acc"] >= 0.85
    assert 1 <= r["mean_iters_per_batch"] <= r["max_iters"] <= 100

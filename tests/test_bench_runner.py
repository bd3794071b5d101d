"""The benchmark runner behind ``python -m optlayers bench``: tables, JSON, failures, suite API."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest

from optlayers.bench import find_suites, format_table, run_bench

ROOT = Path(__file__).resolve().parents[1]

GOOD = '''
def run(full=False):
    return [{"problem": "p", "library": "optlayers", "median_s": 0.5 if full else 0.25, "ratio": 1.0},
            {"problem": "p", "library": "rival", "median_s": 1.0, "ratio": 4.0, "note": "same answer"}]
'''
BAD = '''
def run(full=False, device="cpu"):
    raise RuntimeError("no " + device)
'''


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_alpha.py").write_text(GOOD)
    (tmp_path / "benchmarks" / "bench_beta.py").write_text(BAD)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runner_prints_tables_and_writes_json(fake_checkout, capsys):
    code = run_bench(["alpha"], json_path=str(fake_checkout / "out.json"))
    out = capsys.readouterr().out
    assert code == 0
    assert "## alpha" in out and "| rival" in out and "same answer" in out and "0.25" in out
    data = json.loads((fake_checkout / "out.json").read_text())
    assert data["suites"]["alpha"][1]["ratio"] == 4.0
    assert {"torch", "cpu", "date", "threads"} <= set(data["machine"])
    assert data["wall_s"]["alpha"] >= 0


def test_full_flag_reaches_the_suite(fake_checkout, capsys):
    run_bench(["alpha"], full=True, json_path=str(fake_checkout / "out.json"))
    assert json.loads((fake_checkout / "out.json").read_text())["suites"]["alpha"][0]["median_s"] == 0.5


def test_failing_suite_is_reported_and_the_others_still_run(fake_checkout, capsys):
    code = run_bench([], device="meta", json_path=str(fake_checkout / "out.json"))
    out = capsys.readouterr().out
    assert code == 1
    assert "suite beta failed: RuntimeError: no meta" in out  # the device argument is passed on
    assert "## alpha" in out and "| rival" in out


def test_unknown_suite_and_listing(fake_checkout, capsys):
    assert run_bench(["gamma"]) == 2
    assert "valid: ['alpha', 'beta']" in capsys.readouterr().out
    assert run_bench([], list_only=True) == 0
    assert "suites: alpha, beta" in capsys.readouterr().out


def test_format_table_aligns_columns_and_puts_notes_last():
    table = format_table([{"problem": "a", "library": "x", "median_s": 12345.0, "iterations": 3},
                          {"problem": "bb", "library": "y", "median_s": 0.001234, "note": "n"}])
    lines = table.splitlines()
    assert lines[0].split("|")[-2].strip() == "note"
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert "1.234e+04" in table and "0.00123" in table


def test_every_shipped_suite_exposes_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    suites = find_suites()
    assert {"implicit", "hyper", "qp", "sinkhorn", "sparse_ot", "dro", "lagrangian", "physics_moe",
            "kernels"} <= set(suites)
    for name, path in suites.items():
        spec = importlib.util.spec_from_file_location(f"bench_api_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        params = inspect.signature(module.run).parameters
        assert "full" in params and params["full"].default is False, name

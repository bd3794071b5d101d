"""The group-shift example at --quick size: group DRO beats ERM on the worst group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dro_group_shift.py"


def test_dro_group_shift_quick(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("dro_group_shift", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = mod.run(quick=True, out=str(tmp_path), seeds=3)
    finally:
        torch.set_num_threads(threads)
    erm, gdro, cvar = s["ERM"], s["group DRO"], s["CVaR(0.1)"]
    assert gdro["worst_group_acc"] - erm["worst_group_acc"] >= 0.2
    assert cvar["test_cvar_0.1"] < erm["test_cvar_0.1"]  # CVaR trims the loss tail ...
    assert cvar["worst_group_acc"] < gdro["worst_group_acc"] - 0.15  # ... but not the worst group
    assert (tmp_path / "dro_group_shift.png").stat().st_size > 0

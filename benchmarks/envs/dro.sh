#!/usr/bin/env bash
# Separate environment for the `dro` package baseline of benchmarks/bench_dro.py.
#
# `pip install dro` (0.4.x) declares torch, torchvision, torchattacks, xgboost, lightgbm, pandas,
# ucimlrepo, cvxpy, ... as requirements and would replace the project's torch (2.13.0+cpu) with a
# CUDA build. So it lives in its own venv that *sees* the project's site-packages
# (--system-site-packages: torch, numpy, scipy, scikit-learn, cvxpy with CLARABEL come from there)
# and dro itself is installed with --no-deps. The benchmark only uses dro.linear_model (cvxpy
# models: CVaRDRO, Chi2DRO, KLDRO, TVDRO, WassersteinDRO), which needs nothing beyond that; it
# imports it without running dro/__init__.py, which would also import the neural and tree models
# (torchvision, torchattacks, xgboost, lightgbm, pandas, ucimlrepo are therefore NOT installed).
#
# Usage:  bash benchmarks/envs/dro.sh [VENV_DIR]
# Default VENV_DIR: ${OPTLAYERS_DRO_VENV:-$HOME/.cache/optlayers/venv-dro}, which is where
# bench_dro.py looks for it (set OPTLAYERS_DRO_VENV to point elsewhere, e.g. /tmp/venv-dro).
set -euo pipefail

VENV="${1:-${OPTLAYERS_DRO_VENV:-$HOME/.cache/optlayers/venv-dro}}"
PY="${PYTHON:-python3}"

"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --no-deps "dro==0.4.3"
# dro.linear_model's run-time imports, all expected from the project's environment:
"$VENV/bin/python" - <<'PY'
import importlib, importlib.util, sys, types
for mod in ("numpy", "scipy", "sklearn", "cvxpy", "joblib", "torch"):
    importlib.import_module(mod)
import cvxpy, torch
assert "CLARABEL" in cvxpy.installed_solvers(), "dro's default solver CLARABEL is missing (pip install clarabel)"
spec = importlib.util.find_spec("dro")
pkg = types.ModuleType("dro"); pkg.__path__ = list(spec.submodule_search_locations); sys.modules["dro"] = pkg
lm = importlib.import_module("dro.linear_model")
print("dro venv ready: torch", torch.__version__, "cvxpy", cvxpy.__version__, "models", [m for m in dir(lm) if m.endswith("DRO")])
PY
echo "python: $VENV/bin/python"

#!/usr/bin/env bash
# Separate environment for the qpth baseline of benchmarks/bench_qp.py.
#
# qpth (0.0.18) pins numpy<2 and an old cvxpy range; installing it into the project's
# environment would downgrade numpy and could pull another torch. So it lives in its own venv:
# torch==2.13.0 (the project's version, CPU build) first, then the two run-time dependencies
# qpth imports (numpy, cvxpy) at current versions, then qpth itself with --no-deps.
#
# Usage:  bash benchmarks/envs/qpth.sh [VENV_DIR]
# Default VENV_DIR: ${OPTLAYERS_QPTH_VENV:-$HOME/.cache/optlayers/venv-qpth}, which is where
# bench_qp.py looks for it (set OPTLAYERS_QPTH_VENV to point elsewhere).
set -euo pipefail

VENV="${1:-${OPTLAYERS_QPTH_VENV:-$HOME/.cache/optlayers/venv-qpth}}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip
# CPU build of torch 2.13.0 (a local wheel in PIP_FIND_LINKS is used when present).
"$VENV/bin/python" -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    || "$VENV/bin/python" -m pip install "torch==2.13.0"
"$VENV/bin/python" -m pip install numpy scipy cvxpy
"$VENV/bin/python" -m pip install --no-deps qpth==0.0.18
"$VENV/bin/python" - <<'PY'
import torch, qpth
from qpth.qp import QPFunction
print("qpth venv ready:", "torch", torch.__version__, "qpth", getattr(qpth, "__version__", "0.0.18"))
PY
echo "python: $VENV/bin/python"

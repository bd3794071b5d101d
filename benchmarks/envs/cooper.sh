#!/usr/bin/env bash
# Separate environment for the Cooper baseline of benchmarks/bench_lagrangian.py.
#
# cooper-optim (1.0.1) needs only torch>=1.13.1 and typing-extensions. To be sure pip never
# replaces the project's torch, the venv sees the system site-packages (torch 2.13.0+cpu, numpy,
# scipy, scikit-learn, cvxpy) and Cooper is installed with --no-deps; typing-extensions is
# installed only if the system does not already provide it.
#
# Usage:  bash benchmarks/envs/cooper.sh [VENV_DIR]
# Default VENV_DIR: ${OPTLAYERS_COOPER_VENV:-/tmp/venv-cooper}, which is where
# bench_lagrangian.py looks for it (set OPTLAYERS_COOPER_VENV to point elsewhere).
set -euo pipefail

VENV="${1:-${OPTLAYERS_COOPER_VENV:-/tmp/venv-cooper}}"
PY="${PYTHON:-python3}"

"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --no-deps "cooper-optim==1.0.1"
"$VENV/bin/python" -c "import typing_extensions" 2>/dev/null \
    || "$VENV/bin/python" -m pip install --no-deps "typing-extensions>=4.13.0"
"$VENV/bin/python" - <<'PY'
import torch, cooper
print("cooper venv ready:", "torch", torch.__version__, "cooper", cooper.__version__)
PY
echo "python: $VENV/bin/python"

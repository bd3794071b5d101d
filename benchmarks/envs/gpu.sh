#!/usr/bin/env bash
# Competitors of the GPU kernel benchmark (`python -m optlayers bench kernels --device cuda`),
# brought as wheels to a GPU machine that has no network and maybe an older torch.
#
# Two steps, on two machines:
#
#   bash benchmarks/envs/gpu.sh download   # HERE, with access to the package registry
#   bash benchmarks/envs/gpu.sh install    # THERE (no network): a venv that sees the machine's
#                                          # own torch/triton/numpy and adds only the competitors
#   bash benchmarks/envs/gpu.sh run [--full] [--json FILE]   # THERE: install, then run the suite
#
# What is fetched (all pure-Python wheels, so one download serves any Linux/Python >= 3.9):
#   geomloss 0.3.1                 GeomLoss (online soft-min through KeOps LazyTensors)
#   pykeops 2.3, keopscore 2.3     KeOps (published as source archives: built into wheels here)
#   pybind11                       a run-time requirement of pykeops
#   flash-sinkhorn 0.4.1           FlashSinkhorn (Triton; declares torch>=2.5, triton>=3.1)
# Every install uses --no-deps --no-index --find-links: pip never resolves torch, triton or numpy,
# so the GPU machine's torch stays exactly as it is (flash-sinkhorn's torch/triton pins are not
# enforced; if that machine's triton is too old for it, its rows say "not run" and why).
# Not fetched: numpy, scipy (geomloss imports scipy only in its NumPy backend, unused here).
# KeOps compiles its kernels at first use with the CUDA toolkit it finds (nvrtc from the torch
# wheel or a system CUDA); where it cannot, the GeomLoss rows say "not run" and why.
#
# The wheel folder (default benchmarks/envs/wheels/gpu, git-ignored) travels with the working
# tree; WHEELS=... overrides it. The venv defaults to ${OPTLAYERS_GPU_VENV:-/tmp/venv-gpu-bench}.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WHEELS="${WHEELS:-$HERE/wheels/gpu}"
VENV="${OPTLAYERS_GPU_VENV:-/tmp/venv-gpu-bench}"
PY="${PYTHON:-python3}"

PINNED=("geomloss==0.3.1" "flash-sinkhorn==0.4.1" "pybind11")
SDISTS=("pykeops==2.3" "keopscore==2.3")
NAMES=(geomloss flash-sinkhorn pybind11 pykeops keopscore)

download() {
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "${PINNED[@]}"
    # pykeops/keopscore ship source archives only: build pure-Python wheels once, here
    "$PY" -m pip wheel --no-deps -w "$WHEELS" "${SDISTS[@]}"
    ls -l "$WHEELS"
}

install() {
    [ -d "$WHEELS" ] || { echo "no wheel folder $WHEELS: run 'gpu.sh download' where there is network" >&2; exit 1; }
    "$PY" -m venv --system-site-packages "$VENV"
    local before after
    before="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" --no-deps "${NAMES[@]}"
    after="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    [ "$before" = "$after" ] || { echo "torch changed ($before -> $after): aborting" >&2; exit 1; }
    "$VENV/bin/python" - <<'PY'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for mod in ("triton", "geomloss", "pykeops", "flash_sinkhorn"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:  # reported, the benchmark marks the rows "not run"
        print(mod, "NOT importable:", type(exc).__name__, exc)
PY
}

case "${1:-}" in
    download) download ;;
    install) install ;;
    run)
        shift
        install
        cd "$ROOT"
        "$VENV/bin/python" -m optlayers bench kernels --device cuda "$@"
        ;;
    *) echo "usage: $0 download|install|run [--full] [--json FILE]" >&2; exit 2 ;;
esac

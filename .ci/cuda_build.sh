#!/usr/bin/env bash
# CI's check of the CUDA build on a machine without a GPU: the whole extension, CUDA kernels
# included (kernels/*.cu and csrc/cuda/*.cpp), compiled and linked against a CUDA build of torch
# (torch 2.14.1+cu130 from pip) with nvcc, for sm_80 and sm_90; then the module is imported and
# the quick test files run on the CPU with it, which shows that a CUDA build falls back cleanly
# where no GPU is visible. Nothing here runs a kernel on a GPU.
#
# Works in a copy of the tracked files and a venv under $CUDA_CHECK_DIR (default: a new temporary
# folder, removed at the end), so the CPU build of the checkout is left as it was.
# Skips, saying so, when nvcc is absent or BMSSL_CI_NO_CUDA_BUILD=1; fails when the build or a
# test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ "${BMSSL_CI_NO_CUDA_BUILD:-0}" == 1 ]]; then
  echo "cuda build check: SKIPPED (BMSSL_CI_NO_CUDA_BUILD=1)"
  exit 0
fi
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cuda build check: SKIPPED (no nvcc at $CUDA_HOME/bin/nvcc)"
  exit 0
fi
start=$(date +%s)
work=${CUDA_CHECK_DIR:-$(mktemp -d)}
[[ -n "${CUDA_CHECK_DIR:-}" ]] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$work/src"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.14.1 "numpy<2.3" setuptools wheel ninja pytest hypothesis expecttest tqdm pillow
echo "cuda build check: venv ready ($(( $(date +%s) - start )) s)"

cd "$work/src"
env BMSSL_FORCE_CUDA=1 CUDA_HOME="$CUDA_HOME" MAX_JOBS=${MAX_JOBS:-2} \
  "$work/venv/bin/python" setup.py -q build_ext --inplace > "$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log"; echo "cuda build check: the CUDA build FAILED"; exit 1; }
echo "cuda build check: built ($(( $(date +%s) - start )) s)"

PYTHONPATH="$work/src" "$work/venv/bin/python" - <<'EOF'
import json
import torch
import bmssl._C  # noqa: F401  the module with the CUDA kernels linked in
from pathlib import Path
config = json.loads(Path("bmssl/_build_config.json").read_text())
assert config["cuda_kernels"] and config["torch_cuda"], config
from bmssl._extension import CUDA_OPS, missing_cuda_kernels
assert not missing_cuda_kernels(), f"no CUDA kernel registered for {missing_cuda_kernels()}"
print(f"cuda build check: bmssl._C imports with torch {torch.__version__}, CUDA kernels of {len(CUDA_OPS)} ops registered, archs {config['cuda_archs']}")
EOF
CI=true HYPOTHESIS_PROFILE=ci PYTHONPATH="$work/src" "$work/venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_backends.py tests/test_kl_bootstrap.py tests/test_sgd.py
echo "cuda build check: passed in $(( $(date +%s) - start )) s"

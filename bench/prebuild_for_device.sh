#!/usr/bin/env bash
# Builds bmssl._C with its CUDA kernels here, where there is no GPU, against the GPU machine's
# torch (2.11.0+cu130: PyPI's torch 2.11.0 is that very build), for the device tool to carry, so
# that a GPU session spends its minutes on tests and benchmarks rather than on nvcc.
#
#     bash bench/prebuild_for_device.sh          # writes .prebuilt/ (ignored by git), ~5 min
#
# then a device run with carry [".prebuilt"] (and ".whl" for inf-cl, see bench/gpu_session.sh):
#     OUT=$OUT bash bench/gpu_session.sh
#
# .prebuilt/ holds _C.abi3.so (py_limited_api: built on this machine's CPython, loaded by the GPU
# machine's 3.12), its _build_config.json and source.sha256 (bench/source_hash.sh). gpu_session.sh
# uses the module only when that hash matches the tree it runs in and it registers a CUDA kernel
# for every op; else it builds there as before. The venv (torch 2.11.0 and the nvidia cu13 wheels,
# ~5 GB) stays in $PREBUILD_DIR (default /tmp/bmssl-prebuild) for the next build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
work=${PREBUILD_DIR:-/tmp/bmssl-prebuild}
start=$(date +%s)
[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "prebuild: no nvcc at $CUDA_HOME/bin/nvcc"; exit 1; }

if ! "$work/venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  rm -rf "$work/venv"
  python3 -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" "numpy<2.3" setuptools wheel ninja
fi
echo "prebuild: venv with torch $("$work/venv/bin/python" -c 'import torch; print(torch.__version__)') ($(( $(date +%s) - start )) s)"

rm -rf "$work/src" && mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -cf - -T - | tar -xf - -C "$work/src"  # what the device tool sends
cd "$work/src"
env BMSSL_FORCE_CUDA=1 CUDA_HOME="$CUDA_HOME" MAX_JOBS=${MAX_JOBS:-2} \
  "$work/venv/bin/python" setup.py -q build_ext --inplace > "$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log"; echo "prebuild: the CUDA build FAILED"; exit 1; }
PYTHONPATH="$work/src" "$work/venv/bin/python" -c "
from bmssl._extension import LOAD_ERROR, missing_cuda_kernels
assert not missing_cuda_kernels(), LOAD_ERROR or f'no CUDA kernel registered for {missing_cuda_kernels()}'"
mkdir -p "$ROOT/.prebuilt"
cp bmssl/_C.abi3.so bmssl/_build_config.json "$ROOT/.prebuilt/"
bash bench/source_hash.sh > "$ROOT/.prebuilt/source.sha256"
grep -qxF /.prebuilt/ "$ROOT/.git/info/exclude" 2>/dev/null || echo /.prebuilt/ >> "$ROOT/.git/info/exclude"
echo "prebuild: .prebuilt/_C.abi3.so ($(du -h "$ROOT/.prebuilt/_C.abi3.so" | cut -f1)) for torch $TORCH_VERSION," \
  "sources $(cut -c1-12 "$ROOT/.prebuilt/source.sha256"), in $(( $(date +%s) - start )) s"

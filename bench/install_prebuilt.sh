#!/usr/bin/env bash
# On the GPU machine: puts the carried .prebuilt/_C.abi3.so (bench/prebuild_for_device.sh) into
# bmssl/ when it was built from the sources of this tree and, imported, registers a CUDA kernel for
# every op. Exits 1, saying why and leaving bmssl/ as it was, otherwise: then build there instead.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[[ -f .prebuilt/_C.abi3.so && -f .prebuilt/source.sha256 ]] || { echo "no .prebuilt/ carried"; exit 1; }
here=$(bash bench/source_hash.sh)
[[ "$here" == "$(cat .prebuilt/source.sha256)" ]] \
  || { echo "prebuilt from other sources ($(cut -c1-12 .prebuilt/source.sha256), this tree ${here:0:12})"; exit 1; }
cp .prebuilt/_C.abi3.so .prebuilt/_build_config.json bmssl/
PYTHONPATH=$PWD "$PYTHON" -c "
import sys
from bmssl._extension import LOAD_ERROR, build_config, missing_cuda_kernels
missing = missing_cuda_kernels()
print(LOAD_ERROR or (f'no CUDA kernel registered for {missing}' if missing else
      f'prebuilt bmssl._C (torch {build_config()[\"torch\"]}, archs {build_config()[\"cuda_archs\"]}): every CUDA kernel registered'))
sys.exit(1 if missing else 0)" && exit 0
rm -f bmssl/_C.abi3.so bmssl/_build_config.json
exit 1

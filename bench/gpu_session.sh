#!/usr/bin/env bash
# One prepared GPU session (H100/H200, Python 3.12, torch 2.11+cu130, triton 3.6, no network):
#   1. environment: nvidia-smi, versions, ninja, the commit (BMSSL_COMMIT)
#   2. bmssl._C with the CUDA kernels: the module carried in .prebuilt/ (bench/prebuild_for_device.sh,
#      built off the GPU machine) when bench/install_prebuilt.sh accepts it, else built here
#      (BMSSL_FORCE_CUDA=1, editable, no deps, no index); the tree is on PYTHONPATH either way
#   3. the issues' measurements first, then the checks that take long, most telling first:
#      the CUDA NT-Xent tests (quick, no JIT); the NT-Xent GPU sweep of issue 4 (bf16, d = 128,
#      M in {2, 4}, B in {4096, 16384, 65536}: eager, bmssl-triton, bmssl-cuda, inf-cl when
#      importable); the unroll benchmark of issue 5 (mini configuration, L = 5, δ = 5, K = 4,
#      (a) and (d) first); torch.compile of the NT-Xent (it compiles per shape); compute-sanitizer's
#      memcheck of every CUDA kernel (bench/sanitize_cuda.py); the Triton NT-Xent tiles timed over
#      candidates (bench/ntxent_tiles.py); the other GPU tests (pytest -m gpu, Triton compiled for
#      the GPU: BMSSL_TEST_TRITON_GPU=1); racecheck
# One log per step, the benchmarks' CSV/JSON and the tests' junit XML go to a scratch folder;
# steps.tsv (each step's exit status and seconds) is in $OUT (default bench/results/gpu), and
# after every step the scratch folder is packed into $OUT/gpu_session.tar.gz, so $OUT holds two
# files whenever the run stops (the device tool brings back at most 8). PACK=0 writes everything
# to $OUT unpacked. A failing or timed-out step is logged and the next one runs. The whole session
# stops at BUDGET_S seconds (default 470, under 8 minutes): give the device call a timeout of at
# least 530 s.
#
#     BMSSL_COMMIT=<commit> OUT=/path/to/out bash bench/gpu_session.sh
#
# (the device's copy has no .git: pass the commit, e.g. BMSSL_COMMIT=$(git describe --always
# --dirty) expanded here, so every result row names it)
#
# inf-cl (issue 4's peer at M = 2) is not on the GPU machine: carry its wheel (inf_cl 1.2.1, 15 KB,
# pure Python; it needs numpy and triton, which are there). Here, in the repository's root:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl inf-cl==1.2.1
# and, to skip the build there, bash bench/prebuild_for_device.sh; then the device run, with
# carry [".whl", ".prebuilt"]:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#         && export PYTHONPATH=/tmp/site; BMSSL_COMMIT=... OUT=$OUT bash bench/gpu_session.sh
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/gpu}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
export PYTHONUNBUFFERED=1 BMSSL_COMMIT=${BMSSL_COMMIT:-}
mkdir -p "$OUT"
START=$(date +%s)
if [[ "${PACK:-1}" == 1 ]]; then
  WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
else
  WORK=$OUT
fi

# pack: the scratch folder into $OUT/gpu_session.tar.gz, replacing the last one
pack() {
  [[ "${PACK:-1}" == 1 ]] || return 0
  tar -czf "$OUT/gpu_session.tar.gz.part" -C "$WORK" . && mv "$OUT/gpu_session.tar.gz.part" "$OUT/gpu_session.tar.gz"
}
trap 'pack; exit 143' TERM
trap 'pack; exit 130' INT
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (LIMIT_S, or what is left of the
# budget if less), output to $WORK/NAME.log, appends NAME, exit status, seconds to steps.tsv,
# and packs.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 20)); then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s)"
  local begin=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - begin))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$OUT/steps.tsv"
  cp "$OUT/steps.tsv" "$WORK/steps.tsv" 2>/dev/null
  echo "   rc=$rc in ${took}s ($( ((rc == 124 || rc == 137)) && echo 'timed out' || tail -n 1 "$WORK/$name.log"))"
  pack
  return $rc
}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step environment 30 bash -c "nvidia-smi; echo \"commit \${BMSSL_COMMIT:-unknown}\"; \
$PYTHON -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'; \
$PYTHON -c 'import triton; print(\"triton\", triton.__version__)'; \
$PYTHON -c 'import inf_cl; print(\"inf_cl importable\")' || echo 'inf_cl not importable'; \
$PYTHON -c 'import hypothesis, pytest; print(\"pytest\", pytest.__version__, \"hypothesis\", hypothesis.__version__)'; \
$PYTHON -c 'import pytest_timeout; print(\"pytest-timeout\")' || echo 'no pytest-timeout'; \
command -v ninja || $PYTHON -c 'import ninja; print(\"ninja (module)\")' || echo 'no ninja: the build runs serially'"

# MAX_JOBS: torch's BuildExtension compiles in parallel with ninja
step prebuilt 30 env PYTHON="$PYTHON" bash bench/install_prebuilt.sh \
  || step build 240 env BMSSL_FORCE_CUDA=1 MAX_JOBS=16 PIP_NO_INDEX=1 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .

step backends 20 "$PYTHON" -m bmssl info

# pytest -m gpu tests/, in two parts so the CUDA NT-Xent checks come first; -v and -rfE name
# each test as it runs (a step that times out shows where), pytest-timeout (when there) ends one
# that hangs
PYTEST=(-v -rfE -m gpu -p no:cacheprovider)
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout=60)
step test_cuda_ntxent 90 env BMSSL_TEST_TRITON_GPU=1 \
  "$PYTHON" -m pytest "${PYTEST[@]}" tests/test_ntxent.py -k "cuda" --junitxml="$WORK/test_cuda_ntxent.xml"

SWEEP=(--device cuda --dtypes bf16 --dims 128 --batches 4096 16384 65536 --variant in --repeats 5)
step bench_ntxent_m2 90 "$PYTHON" -m bmssl.bench.ntxent "${SWEEP[@]}" --views 2 --no-compile \
  --out "$WORK/ntxent_m2"
step bench_ntxent_m4 90 "$PYTHON" -m bmssl.bench.ntxent "${SWEEP[@]}" --views 4 --no-compile \
  --out "$WORK/ntxent_m4"

# issue 5 on the GPU: (a) baseline, (d) fused + CUDA graph (bmssl.cuda_graph: the whole step
# captured once, replayed), (c) fused, (b) twins; mini configuration, L = 5, δ = 5, K = 4, order 2;
# time per outer step and the allocator's peak (setup and capture included)
step bench_unroll 120 "$PYTHON" bench/bench_unroll.py --device cuda --configs mini --inner-steps 5 \
  --target-steps 5 --tasks 4 --repeats 5 --providers baseline engine_fused_graph engine_fused engine_torch \
  --out "$WORK/unroll_mini"

# torch.compile of the eager reference: compiles per shape (the no-grad and grad graphs, and again
# when B changes)
step bench_ntxent_compile 120 "$PYTHON" -m bmssl.bench.ntxent "${SWEEP[@]}" --views 2 4 \
  --providers torch_compile --out "$WORK/ntxent_compile"

# the CUDA kernels under compute-sanitizer (bench/sanitize_cuda.py): out-of-bounds accesses, then
# shared-memory races (racecheck is slow: fewer cases, last). No caching allocator under memcheck:
# an access past a tensor but inside the allocator's larger block would go unseen.
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
step memcheck 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PYTHON" bench/sanitize_cuda.py

# the Triton NT-Xent tiles, chosen from ptxas's figures, timed over candidates (bf16, B = 16384, d = 128)
step ntxent_tiles 75 "$PYTHON" bench/ntxent_tiles.py --out "$WORK/ntxent_tiles"

step test_gpu_rest 150 env BMSSL_TEST_TRITON_GPU=1 \
  "$PYTHON" -m pytest "${PYTEST[@]}" tests/ -k "not (ntxent and cuda)" --durations=15 \
  --junitxml="$WORK/test_gpu_rest.xml"

step racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 1 "$PYTHON" bench/sanitize_cuda.py --quick

echo "== done in $(($(date +%s) - START))s; steps:"
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
pack

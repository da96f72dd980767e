#!/usr/bin/env bash
# One run on a CUDA machine (no network needed), in under 10 minutes: build posenc with its CUDA op, run the
# whole test suite (CPU and GPU tests), run the GPU benchmark (CUDA-graph and eager times), the end-to-end
# preset (a Llama-3.2-1B-shaped model: a training step and greedy decoding) and the memory-floor measurement
# (benchmarks/access_floor.cu). Log, JSON, PNG and tables go to $OUT (default ./out).
#   OUT=/tmp/out bash scripts/gpu_check.sh
# Pure-Python wheels found in .whl/ (e.g. liger-kernel, which the benchmark compares with) are put on
# PYTHONPATH first; BENCH_PRESET picks the benchmark preset (default "gpu"), PYTEST_ARGS adds pytest flags,
# TEST_PATHS narrows the tests (default tests/), PYTEST_WORKERS sets pytest-xdist's processes (default 8), STEPS
# picks the steps after the build (default "tests bench e2e floor"; a call has at most 10 minutes on our machines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 POSENC_REQUIRE_EXTENSION=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
STEPS=" ${STEPS:-tests bench e2e floor} "
status=0
want() { [[ "$STEPS" == *" $1 "* ]]; }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
exec > >(tee "$LOG") 2>&1
step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c 'import torch, sys; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())'
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/posenc-site .whl/*.whl \
    && export PYTHONPATH=/tmp/posenc-site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (POSENC_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
# pip's editable install first; where it cannot work offline (some pip/setuptools pairs re-run pip with
# build isolation, which needs the network), build the extension in place and put the checkout on the path.
if POSENC_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "built with pip install -e ."
elif POSENC_CUDA=1 $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
  echo "pip install -e . failed offline (see build.log); built in place with setup.py build_ext --inplace"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  tail -n 60 "$OUT/build.log"; echo "BUILD FAILED"; status=1
fi
grep -E "ptxas (info|warning)|error" "$OUT/build.log" | tail -n 10
$PY -c 'import posenc; print("backend cpu:", posenc.backend("cpu")); print("backend cuda:", posenc.backend("cuda"))' || status=1

if want tests; then
  step "tests"
  XDIST=$($PY -c 'import xdist' >/dev/null 2>&1 && echo "-n ${PYTEST_WORKERS:-8}")  # pytest-xdist where installed
  $PY -m pytest -q -p no:cacheprovider $XDIST ${PYTEST_ARGS:-} ${TEST_PATHS:-tests/} || status=1
fi

if want bench; then
  step "benchmark"
  $PY benchmarks/bench_rotary.py --device cuda --preset "${BENCH_PRESET:-gpu}" --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    2> "$OUT/bench_progress.log" | tee "$OUT/bench.txt" || status=1
fi
if want e2e; then
  step "end to end (Llama-3.2-1B shape, random weights, bf16, SDPA, eager: unpatched / posenc rope / liger rope)"
  $PY -m posenc bench --device cuda --preset e2e --json "$OUT/e2e.json" --plot "$OUT/e2e.png" \
    2> "$OUT/e2e_progress.log" | tee "$OUT/e2e.txt" || status=1
fi
if want floor; then
  step "memory floor (benchmarks/access_floor.cu: the ideal access pattern of a partial in-place rotation)"
  if command -v nvcc >/dev/null 2>&1; then
    ARCH=$($PY -c 'import torch; print("sm_%d%d" % torch.cuda.get_device_capability())')
    nvcc -O3 -std=c++17 -arch="$ARCH" -o /tmp/posenc_access_floor benchmarks/access_floor.cu \
      && /tmp/posenc_access_floor | tee "$OUT/access_floor.txt" || status=1
  else
    echo "nvcc not found: skipped"
  fi
fi
step "done, status $status"
exit $status

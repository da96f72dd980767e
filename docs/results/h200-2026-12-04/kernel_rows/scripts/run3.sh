#!/usr/bin/env bash
# Call 3: build (gpu_check), the CUDA tests, then the benchmark and the end-to-end preset.
set -u
export PYTHONUNBUFFERED=1
t0=$(date +%s)
STEPS=" " OUT=$OUT/b1 bash scripts/gpu_check.sh > /dev/null 2>&1; tail -5 $OUT/b1/gpu_check.log; echo "build $(( $(date +%s) - t0 ))s"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site .whl/*.whl >/dev/null 2>&1
PYTHONPATH=$PWD:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_cuda.py tests/test_ops.py tests/test_attention.py tests/test_bench.py tests/test_errors.py tests/test_launch_plan.py -k "cuda or mixed_devices or test_errors or launch_plan" > $OUT/tests.txt 2>&1; tail -3 $OUT/tests.txt
echo "tests $(( $(date +%s) - t0 ))s"
STEPS="bench e2e" OUT=$OUT bash scripts/gpu_check.sh > $OUT/run.log 2>&1; grep -E "posenc |liger |copy " $OUT/bench.txt | head -80; tail -30 $OUT/run.log | grep -v "^ *$" | tail -20
rm -rf $OUT/b1
echo "total $(( $(date +%s) - t0 ))s"

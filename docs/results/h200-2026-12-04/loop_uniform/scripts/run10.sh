#!/usr/bin/env bash
# Call 10 (final): build, CUDA tests, benchmark + e2e, instruction counts, a plan sweep of the shipped planner.
set -u
ROOT=$PWD; export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site .whl/*.whl >/dev/null 2>&1
rm -rf /tmp/v; mkdir -p /tmp/v/knob; cp -r csrc posenc setup.py pyproject.toml /tmp/v/knob/; python3 .exp/knob.py /tmp/v/knob/csrc "" bf16
(cd /tmp/v/knob && POSENC_CUDA=1 MAX_JOBS=6 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > /tmp/v/b.log 2>&1; echo "knob build rc $?") &
MAX_JOBS=10 STEPS=" " OUT=/tmp/b1 bash scripts/gpu_check.sh > /dev/null 2>&1; tail -4 /tmp/b1/gpu_check.log; grep -E "registers" /tmp/b1/build.log | head -2; echo "build $(( $(date +%s) - t0 ))s"
wait
PYTHONPATH=$PWD:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_cuda.py tests/test_ops.py tests/test_attention.py tests/test_bench.py tests/test_errors.py tests/test_launch_plan.py -k "cuda or mixed_devices or test_errors or launch_plan" > $OUT/tests.txt 2>&1; tail -3 $OUT/tests.txt
echo "tests $(( $(date +%s) - t0 ))s"
STEPS="bench e2e" OUT=/tmp/o bash scripts/gpu_check.sh > /tmp/o.log 2>&1; cp /tmp/o/bench.txt /tmp/o/bench.json /tmp/o/bench.png /tmp/o/e2e.txt /tmp/o/e2e.json $OUT/ 2>/dev/null
grep -E " posenc | liger | copy " $OUT/bench.txt | grep -v "fwd+bwd.*copy" | head -60; cat $OUT/e2e.txt
echo "bench $(( $(date +%s) - t0 ))s"
export PYTHONPATH=$PWD:/tmp/posenc-site
cat > /tmp/prof.py <<'PY'
import sys, torch, posenc, posenc.bench as b
shape = {"gemma": b.GEMMA, "llama": b.LLAMA_8B}[sys.argv[1]]
enc = b._encoding("rope", shape.head_dim); x = b._Inputs(shape, torch.bfloat16, "cuda", enc, "fwd")
for _ in range(3): enc.apply(x.q, x.k, x.positions)
torch.cuda.synchronize()
PY
M="--metrics smsp__inst_executed.sum,gpu__time_duration.sum,dram__bytes.sum,sm__cycles_elapsed.avg"
for c in gemma llama; do timeout 60 ncu --launch-skip 2 --launch-count 1 -k regex:rotary $M python3 /tmp/prof.py $c 2>&1 | grep -E "smsp__|gpu__|dram__|sm__" | sed "s/^/$c /"; done | tee $OUT/ncu.txt
OUT=/tmp/v PYTHONPATH=/tmp/v/knob:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 TPB=1,2,3,4 TPB_gemma4_inpl=8,12,16 THR=128 timeout 100 python3 .exp/sweep2.py gemma,gemma4_inpl,hope_inpl 2>&1 | grep -v Warning | tee $OUT/sweep.txt
echo "total $(( $(date +%s) - t0 ))s"

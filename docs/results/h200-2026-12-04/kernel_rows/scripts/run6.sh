#!/usr/bin/env bash
# Call 6: Nsight Compute of the final kernel on Gemma and Llama forward, and liger on Gemma.
set -u
export PYTHONUNBUFFERED=1
t0=$(date +%s)
MAX_JOBS=16 STEPS=" " OUT=/tmp/b1 bash scripts/gpu_check.sh > /dev/null 2>&1; tail -2 /tmp/b1/gpu_check.log; echo "build $(( $(date +%s) - t0 ))s"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site .whl/liger*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/posenc-site
cat > /tmp/prof.py <<'PY'
import sys, torch, posenc, posenc.bench as b
shape = {"gemma": b.GEMMA, "llama": b.LLAMA_8B}[sys.argv[1]]
enc = b._encoding("rope", shape.head_dim); x = b._Inputs(shape, torch.bfloat16, "cuda", enc, "fwd")
if sys.argv[2] == "posenc":
    for _ in range(3): enc.apply(x.q, x.k, x.positions)
else:
    lig = b._liger()
    for _ in range(3): lig(x.q.transpose(1, 2), x.k.transpose(1, 2), x.cos, x.sin)
torch.cuda.synchronize()
PY
S="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis"
timeout 60 ncu --launch-skip 2 --launch-count 1 -k regex:rotary $S python3 /tmp/prof.py gemma posenc > $OUT/ncu_gemma_posenc.txt 2>&1
timeout 60 ncu --launch-skip 2 --launch-count 1 -k regex:rope $S python3 /tmp/prof.py gemma liger > $OUT/ncu_gemma_liger.txt 2>&1
timeout 60 ncu --launch-skip 2 --launch-count 1 -k regex:rotary $S python3 /tmp/prof.py llama posenc > $OUT/ncu_llama_posenc.txt 2>&1
for f in $OUT/ncu_*.txt; do echo "== $f"; grep -E " Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Warp Per|No Eligible|Warp Cycles Per Issued|Mem Busy|Max Bandwidth|L2 Hit|Stall|Block Limit Reg" $f | head -20; done
echo "total $(( $(date +%s) - t0 ))s"

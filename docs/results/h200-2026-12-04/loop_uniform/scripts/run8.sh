#!/usr/bin/env bash
# Call 8: Nsight Compute source counters (instructions executed per SASS instruction) of the shipped kernel.
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
M="--metrics smsp__inst_executed.sum,smsp__inst_issued.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum,dram__bytes.sum,smsp__thread_inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_global_ld.sum"
for c in "gemma posenc rotary" "gemma liger rope" "llama posenc rotary"; do set -- $c
  timeout 60 ncu --launch-skip 2 --launch-count 1 -k regex:$3 $M python3 /tmp/prof.py $1 $2 > $OUT/metrics_$1_$2.txt 2>&1
done
timeout 90 ncu --launch-skip 2 --launch-count 1 -k regex:rotary --section SourceCounters --page source --print-source sass --csv python3 /tmp/prof.py gemma posenc > $OUT/src_gemma_posenc.csv 2>&1
timeout 90 ncu --launch-skip 2 --launch-count 1 -k regex:rotary --section SourceCounters --page source --print-source sass --csv python3 /tmp/prof.py llama posenc > $OUT/src_llama_posenc.csv 2>&1
timeout 90 ncu --launch-skip 2 --launch-count 1 -k regex:rope --section SourceCounters --page source --print-source sass --csv python3 /tmp/prof.py gemma liger > $OUT/src_gemma_liger.csv 2>&1
for f in $OUT/metrics_*.txt; do echo "== $f"; grep -E "smsp__|sm__|gpu__|dram__|l1tex__" $f; done
head -c 600 $OUT/src_gemma_posenc.csv; echo; wc -l $OUT/*.csv
echo "total $(( $(date +%s) - t0 ))s"

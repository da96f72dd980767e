#!/usr/bin/env bash
# Call 4: two builds of the plan-override variant (launch bounds 256: 40 registers; 256, 8: 32 registers), plan sweeps.
set -u
ROOT=$PWD; export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
rm -rf /tmp/v; mkdir -p /tmp/v
mk() { mkdir -p /tmp/v/$1; cp -r $ROOT/csrc $ROOT/posenc $ROOT/setup.py $ROOT/pyproject.toml /tmp/v/$1/; }
mk r40; mk r32
python3 .exp/knob.py /tmp/v/r40/csrc "256"; python3 .exp/knob.py /tmp/v/r32/csrc "256, 8"
for v in r40 r32; do (cd /tmp/v/$v && POSENC_CUDA=1 MAX_JOBS=8 python3 setup.py build_ext --inplace > /tmp/v/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s"; grep -E "error" /tmp/v/b_$v.log | head -3) & done
wait
for v in r40 r32; do
  echo "=== $v"
  PYTHONPATH=/tmp/v/$v:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 TPB=1,2,3,4,6,8,12,16 THR=128,256 timeout 200 python3 .exp/sweep.py gemma,llama,gemma4_inpl,hope_inpl,prope_inpl,gemma4_fwd,llama_long,rope_inpl 2>&1 | grep -v Warning | tee $OUT/sweep_$v.txt
  echo "$v done $(( $(date +%s) - t0 ))s"
done

#!/usr/bin/env bash
# Call 7: the batched kernel (bf16-only experiment builds of the new and the previous csrc), plan sweeps.
set -u
ROOT=$PWD; export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
rm -rf /tmp/v; mkdir -p /tmp/v
mk() { mkdir -p /tmp/v/$1; cp -r $ROOT/posenc $ROOT/setup.py $ROOT/pyproject.toml /tmp/v/$1/; cp -r $2 /tmp/v/$1/csrc; python3 .exp/knob.py /tmp/v/$1/csrc "" bf16; }
mk new $ROOT/csrc; mk old $ROOT/.exp/old_csrc
for v in new old; do (cd /tmp/v/$v && POSENC_CUDA=1 MAX_JOBS=8 python3 setup.py build_ext --inplace > /tmp/v/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s"; grep -E "error" /tmp/v/b_$v.log | head -5) & done
wait
grep -E "registers" /tmp/v/b_new.log | head -3
export TPB_gemma=1,2,3,4,6 TPB_llama=1,2 TPB_gemma4_inpl=4,8,12,16 TPB_hope_inpl=1,2 TPB_gemma4_fwd=1,2 TPB_llama_long=1 TPB_rope_inpl=1,2 TPB_decode=1 THR=128
C=gemma,llama,gemma4_inpl,hope_inpl,gemma4_fwd,llama_long,rope_inpl,decode
echo "=== new"
PYTHONPATH=/tmp/v/new:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 MODES=001,002,003,004,101,102,103,104,011 OUT=/tmp/v/new timeout 250 python3 .exp/sweep2.py $C 2>&1 | grep -v Warning | tee $OUT/sweep_new.txt
echo "new done $(( $(date +%s) - t0 ))s"
echo "=== old"
PYTHONPATH=/tmp/v/old:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 MODES=00,10,01 OUT=/tmp/v/old timeout 150 python3 .exp/sweep2.py $C 2>&1 | grep -v Warning | tee $OUT/sweep_old.txt
cp /tmp/v/new/sweep.json $OUT/sweep_new.json; cp /tmp/v/old/sweep.json $OUT/sweep_old.json
echo "total $(( $(date +%s) - t0 ))s"

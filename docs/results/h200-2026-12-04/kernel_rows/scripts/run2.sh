#!/usr/bin/env bash
# Experiment call 2: build new (working tree), old (.gpu = HEAD) and new+knob; CUDA tests on new; A/B; plan sweep.
set -u
ROOT=$PWD; export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
rm -rf /tmp/v; mkdir -p /tmp/v
mk() { mkdir -p /tmp/v/$1; cp -r $2/csrc $2/posenc $2/setup.py $2/pyproject.toml /tmp/v/$1/; }
mk new $ROOT; mk old $ROOT/.gpu; mk knob $ROOT; cp $ROOT/posenc/bench.py /tmp/v/old/posenc/bench.py
python3 .exp/knob.py /tmp/v/knob/csrc
(cd /tmp/v/new && POSENC_CUDA=1 MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build_new.log 2>&1); echo "new build rc $? $(( $(date +%s) - t0 ))s"
grep -E "error" $OUT/build_new.log | head -5
for v in old knob; do (cd /tmp/v/$v && POSENC_CUDA=1 MAX_JOBS=4 python3 setup.py build_ext --inplace > /tmp/v/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s") & done
# the CUDA tests against the new build (the tree's tests, the new build's package)
mkdir -p /tmp/tt && cp -r $ROOT/tests /tmp/tt/ && cp $ROOT/pyproject.toml /tmp/tt/
(cd /tmp/tt && PYTHONPATH=/tmp/v/new:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_cuda.py tests/test_ops.py tests/test_attention.py tests/test_errors.py tests/test_launch_plan.py tests/test_bench.py -k "cuda or mixed_devices or test_errors or launch_plan" 2>&1 | tail -15 | tee $OUT/tests_new.txt)
echo "tests done $(( $(date +%s) - t0 ))s"
wait
cd /tmp
run() {
  POSENC_REQUIRE_EXTENSION=1 PYTHONPATH=/tmp/v/$1:/tmp/posenc-site python3 -c "
import posenc, posenc.bench as b
assert 'CUDA' in posenc.backend('cuda') and posenc.__file__.startswith('/tmp/v/$1/'), (posenc.backend('cuda'), posenc.__file__)
rows = $2
print('$1', $3, ' '.join(f\"{r['shape'][:7]}/{r['encoding']}/{r['pass']}/{r['method']}={r['x_copy']:.3f}|{r['x_copy_eager']:.3f}{'' if r['check'] in ('ok', 'floor') else '!' + str(r['check'])}\" for r in rows if r['method'] != 'copy' and r['x_copy'] is not None))
" 2>&1 | grep -v "Warning\|Backend impl\|warn"
}
AB="b.run('cuda', shapes='gpu', methods=['copy', 'posenc', 'posenc_hf', 'liger'])"
for round in 1 2; do for v in old new; do run $v "$AB" $round | tee -a $OUT/ab.txt; done; echo "ab round $round $(( $(date +%s) - t0 ))s"; done
cd $ROOT
PYTHONPATH=/tmp/v/knob:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1 timeout 150 python3 .exp/sweep.py gemma4_inpl,hope_inpl,prope_inpl,gemma,llama,rope_inpl 2>&1 | grep -v Warning | tee $OUT/sweep.txt
echo "total $(( $(date +%s) - t0 ))s"

#!/usr/bin/env bash
# A/B on the GPU: main's kernels (old: in place, a partial last chunk in pieces) against whole last units in
# place, pipelined by the planner's rule (whole) or never pipelined when the last unit is partial (nopipe).
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
for v in old whole nopipe; do rm -rf /tmp/$v; cp -r $ROOT/.gpu /tmp/$v; done
cp $ROOT/.gpu/diag/old_csrc/* /tmp/old/csrc/
sed -i 's/: (inter ? 2 \* n < in.rotary_dim : n < half) \&\&/: n % pairs_per_unit == 0 \&\& (inter ? 2 * n < in.rotary_dim : n < half) \&\&/' /tmp/nopipe/csrc/launch_plan.h
grep -c "n % pairs_per_unit == 0" /tmp/nopipe/csrc/launch_plan.h
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=6
t0=$(date +%s)
for v in old whole nopipe; do
  (cd /tmp/$v && POSENC_CUDA=1 python3 setup.py build_ext --inplace > /tmp/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s") &
done
wait
cd /tmp
for round in 1 2 3; do
  for v in old whole nopipe; do
    POSENC_REQUIRE_EXTENSION=1 PYTHONPATH=/tmp/$v:/tmp/posenc-site python3 -c "
import posenc, posenc.bench as b
assert 'CUDA' in posenc.backend('cuda'), posenc.backend('cuda')
rows = b.run('cuda', shapes=['llama-8b', 'gemma4-global'], methods=['copy', 'posenc', 'posenc_hf'], passes=['fwd', 'fwd_inplace'])
print('$v', $round, ' '.join(f\"{r['shape'][:7]}/{r['encoding']}/{r['pass']}/{r['method'][6:] or 'op'}={r['x_copy']:.3f}{'' if r['check'] == 'ok' else '!' + str(r['check'])}\" for r in rows if r['method'] != 'copy'))
" 2>&1 | grep -v "Warning\|Backend impl"
  done
done
echo "total $(( $(date +%s) - t0 ))s"

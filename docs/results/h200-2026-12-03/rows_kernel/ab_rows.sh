#!/usr/bin/env bash
# A/B on the GPU: main's kernels (old) against the rows kernel with at most 4 (k4) or 2 (k2) rows a thread,
# built side by side, timed in alternating processes against a copy in the same process.
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
for v in old k4 k2; do rm -rf /tmp/$v; cp -r $ROOT/.gpu /tmp/$v; done
cp $ROOT/.gpu/diag/old_csrc/* /tmp/old/csrc/
sed -i 's/kMaxRowsPerThread = 4/kMaxRowsPerThread = 2/' /tmp/k2/csrc/launch_plan.h
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=6
t0=$(date +%s)
for v in old k4 k2; do
  (cd /tmp/$v && POSENC_CUDA=1 python3 setup.py build_ext --inplace > /tmp/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s") &
done
wait
grep -h "rows_kernel\|Used" /tmp/b_k4.log | head -4
cd /tmp
for round in 1 2; do
  for v in old k4 k2; do
    POSENC_REQUIRE_EXTENSION=1 PYTHONPATH=/tmp/$v:/tmp/posenc-site python3 -c "
import posenc, posenc.bench as b
assert 'CUDA' in posenc.backend('cuda'), posenc.backend('cuda')
ms = ['copy', 'posenc', 'posenc_hf'] + (['liger'] if $round == 1 and '$v' == 'old' else [])
rows = b.run('cuda', shapes=['llama-8b', 'gemma', 'gemma4-global', 'decode'], methods=ms)
for r in rows:
    if r['method'] != 'copy':
        print('$v', $round, r['shape'], r['encoding'], r['pass'], r['method'], '%.3f' % r['x_copy'], '%.3f' % r['x_copy_eager'], r['check'])
" 2>&1 | grep -v Warning
  done
done
echo "total $(( $(date +%s) - t0 ))s"

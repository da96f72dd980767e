#!/usr/bin/env bash
# A/B on the GPU, run from the checkout root (the working tree = "new"; .gpu = main's HEAD = "old").
#  host: old vs new (eager host time: Encoding.apply's resolved arguments, the op-checked fast path, the C++
#        autograd kernel that skips the Function when nothing records); same bench code (new bench.py) in both.
#  in place planner: new vs variants of launch_plan.h (in-place units per thread 2/3/6; in place always pipelined).
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
rm -rf /tmp/v; mkdir -p /tmp/v
mk() { mkdir -p /tmp/v/$1; cp -r $2/csrc $2/posenc $2/setup.py $2/pyproject.toml /tmp/v/$1/; }
mk old $ROOT/.gpu; cp $ROOT/posenc/bench.py /tmp/v/old/posenc/bench.py
for v in new upt2 upt3 upt6 pipe; do mk $v $ROOT; done
L=csrc/launch_plan.h
sed -i 's/in.inplace ? 4 : pipelined/in.inplace ? 2 : pipelined/' /tmp/v/upt2/$L
sed -i 's/in.inplace ? 4 : pipelined/in.inplace ? 3 : pipelined/' /tmp/v/upt3/$L
sed -i 's/in.inplace ? 4 : pipelined/in.inplace ? 6 : pipelined/' /tmp/v/upt6/$L
sed -i 's/ \&\&\n *4 \* L.n_stride < per_token//' /tmp/v/pipe/$L
python3 - <<'PY'
import re
p='/tmp/v/pipe/csrc/launch_plan.h'; s=open(p).read()
s2=re.sub(r"\(inter \? 2 \* n < in\.rotary_dim : n < half\) &&\s*4 \* L\.n_stride < per_token", "(inter ? 2 * n < in.rotary_dim : n < half)", s)
assert s2 != s; open(p,'w').write(s2)
PY
for v in upt2 upt3 upt6 pipe; do echo "$v: $(diff /tmp/v/new/$L /tmp/v/$v/$L | grep -c '^>') changed lines"; done
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=3
t0=$(date +%s)
for v in old new upt2 upt3 upt6 pipe; do
  (cd /tmp/v/$v && POSENC_CUDA=1 python3 setup.py build_ext --inplace > /tmp/v/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s") &
done
wait
cd /tmp
run() {  # variant, python code producing rows -> one line
  POSENC_REQUIRE_EXTENSION=1 PYTHONPATH=/tmp/v/$1:/tmp/posenc-site python3 -c "
import posenc, posenc.bench as b, json
assert 'CUDA' in posenc.backend('cuda') and posenc.__file__.startswith('/tmp/v/$1/'), (posenc.backend('cuda'), posenc.__file__)
rows = $2
print('$1', $3, ' '.join(f\"{r['shape'][:7]}/{r['encoding']}/{r['pass']}/{r['method']}={r['x_copy']:.3f}|{r['x_copy_eager']:.3f}({r['us_eager']:.0f}us){'' if r['check'] in ('ok', 'floor') else '!' + str(r['check'])}\" for r in rows if r['method'] != 'copy' and r['x_copy'] is not None))
" 2>&1 | grep -v "Warning\|Backend impl\|warn"
}
HOST="b.run('cuda', shapes=['llama-8b', 'decode', 'gemma'], encodings=['rope'], methods=['copy', 'posenc', 'posenc_hf', 'native_mul'], passes=['fwd', 'fwd+bwd', 'decode'])"
INPL="b.run('cuda', shapes=['llama-8b', 'gemma4-global'], methods=['copy', 'posenc', 'posenc_hf'], passes=['fwd_inplace'])"
for round in 1 2; do for v in old new; do run $v "$HOST" $round; done; done
echo "host done $(( $(date +%s) - t0 ))s"
for round in 1 2 3; do for v in new upt2 upt3 upt6 pipe; do run $v "$INPL" $round; done; done
echo "total $(( $(date +%s) - t0 ))s"

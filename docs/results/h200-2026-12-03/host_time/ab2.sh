#!/usr/bin/env bash
# A/B on the GPU: the working tree ("new") against two kernel variants built side by side (pipesm.py):
#  pipesm      in place, the pipeline also where cos/sin are many per unit (Gemma 4), seq-major blocks pipelined too
#  pipesm_all  and out of place, the pipeline everywhere (also where every unit rotates: Llama, Gemma)
# Each variant is first checked against the reference (rotary_reference) on the benchmark's kinds of calls.
ROOT=$PWD
rm -rf /tmp/w; mkdir -p /tmp/w
for v in new pipesm pipesm_all; do mkdir -p /tmp/w/$v; cp -r $ROOT/csrc $ROOT/posenc $ROOT/setup.py $ROOT/pyproject.toml /tmp/w/$v/; done
python3 $ROOT/.gpu/diag/pipesm.py /tmp/w/pipesm
python3 $ROOT/.gpu/diag/pipesm.py /tmp/w/pipesm_all
python3 - <<'PY'
p='/tmp/w/pipesm_all/csrc/launch_plan.h'; s=open(p).read()
old="(!in.inplace ? (inter ? 2 * n < D : n < half || 2 * half < D)"
assert old in s; open(p,'w').write(s.replace(old, "(!in.inplace ? true"))
PY
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=5
t0=$(date +%s)
for v in new pipesm pipesm_all; do
  (cd /tmp/w/$v && POSENC_CUDA=1 python3 setup.py build_ext --inplace > /tmp/w/b_$v.log 2>&1; echo "$v build rc $? $(( $(date +%s) - t0 ))s") &
done
wait
cd /tmp
for v in new pipesm pipesm_all; do
  POSENC_REQUIRE_EXTENSION=1 PYTHONPATH=/tmp/w/$v python3 -c "
import torch, posenc
from posenc.ops import rotary_reference
assert posenc.__file__.startswith('/tmp/w/$v/')
torch.manual_seed(0)
worst = 0.0
for (B, S, hq, hk, D, enc) in [(4, 64, 8, 1, 512, posenc.PRoPE(512, p=0.25)), (4, 64, 8, 1, 256, posenc.RoPE(256)),
                              (2, 40, 32, 8, 128, posenc.RoPE(128)), (2, 40, 32, 8, 128, posenc.HoPE(128)),
                              (3, 17, 5, 2, 64, posenc.PRoPE(64, p=0.75))]:
    enc = enc.cuda()
    for shared in (True, False):
        pos = torch.arange(S, device='cuda').expand(B, S) if shared else torch.randint(0, 9999, (B, S), device='cuda')
        q = torch.randn(B, S, hq, D, device='cuda', dtype=torch.bfloat16); k = torch.randn(B, S, hk, D, device='cuda', dtype=torch.bfloat16)
        ref = rotary_reference(q, k, None, None, enc.inv_freq64, pos, 1.0, D, enc.op_pairs, False, False)
        out = enc.apply(q, k, pos)
        qi, ki = q.clone(), k.clone(); enc.apply(qi, ki, pos, inplace=True)
        for a, b in zip((*out, qi, ki), (*ref, *ref)):
            worst = max(worst, ((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item())
print('$v check: worst rel err vs reference %.2e (%s)' % (worst, 'ok' if worst < 2e-2 else 'WRONG'))
" 2>&1 | grep -v "Warning\|warn"
done
run() {
  POSENC_REQUIRE_EXTENSION=1 PYTHONPATH=/tmp/w/$1 python3 -c "
import posenc, posenc.bench as b
assert 'CUDA' in posenc.backend('cuda') and posenc.__file__.startswith('/tmp/w/$1/')
rows = b.run('cuda', shapes=['llama-8b', 'gemma', 'gemma4-global'], methods=['copy', 'posenc', 'posenc_hf'], passes=['fwd', 'fwd_inplace'])
print('$1', $2, ' '.join(f\"{r['shape'][:7]}/{r['encoding']}/{r['pass']}/{r['method']}={r['x_copy']:.3f}{'' if r['check'] == 'ok' else '!' + str(r['check'])}\" for r in rows if r['method'] != 'copy' and r['x_copy'] is not None))
" 2>&1 | grep -v "Warning\|Backend impl\|warn"
}
for round in 1 2 3; do for v in new pipesm pipesm_all; do run $v $round; done; done
echo "total $(( $(date +%s) - t0 ))s"

#!/usr/bin/env bash
# Experiment call: build the plan-override variant, sweep plans, ncu + SASS of the hot kernels.
set -u
ROOT=$PWD; export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/posenc-site $ROOT/.whl/*.whl >/dev/null 2>&1
rm -rf /tmp/kn; mkdir -p /tmp/kn; cp -r csrc posenc setup.py pyproject.toml /tmp/kn/
python3 .exp/knob.py /tmp/kn/csrc
(cd /tmp/kn && POSENC_CUDA=1 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1); echo "build rc $? $(( $(date +%s) - t0 ))s"
grep -E "ptxas|error" $OUT/build.log | tail -3
export PYTHONPATH=/tmp/kn:/tmp/posenc-site POSENC_REQUIRE_EXTENSION=1
which ncu cuobjdump nvdisasm
SO=$(ls /tmp/kn/posenc/*.so | head -5); echo $SO
for so in $SO; do cuobjdump -sass $so 2>/dev/null | awk '/Function : .*rotary_kernelIN3c108BFloat16ELi8ELb0ELb0ELb0/{p=1} /Function : /{if(!/BFloat16ELi8ELb0ELb0ELb0/)p=0} p' > $OUT/plain_bf16.sass; done
wc -l $OUT/plain_bf16.sass
timeout 420 python3 .exp/sweep.py ${CASES_ARG:-} 2>&1 | grep -v Warning | tee $OUT/sweep.txt
echo "sweep done $(( $(date +%s) - t0 ))s"
if which ncu >/dev/null && [ $(( $(date +%s) - t0 )) -lt 480 ]; then
  cat > /tmp/prof.py <<'PY'
import torch, posenc, posenc.bench as b
enc = b._encoding("rope", 256); x = b._Inputs(b.GEMMA, torch.bfloat16, "cuda", enc, "fwd")
for _ in range(3): enc.apply(x.q, x.k, x.positions)
lig = b._liger()
for _ in range(3): lig(x.q.transpose(1, 2), x.k.transpose(1, 2), x.cos, x.sin)
torch.cuda.synchronize()
PY
  timeout 90 ncu --launch-skip 2 --launch-count 1 -k regex:rotary --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats python3 /tmp/prof.py > $OUT/ncu_posenc.txt 2>&1
  timeout 90 ncu --launch-skip 2 --launch-count 1 -k regex:rope --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats python3 /tmp/prof.py > $OUT/ncu_liger.txt 2>&1
  grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Issued Warp|No Eligible|Block Limit|Warp Cycles Per Issued" $OUT/ncu_posenc.txt $OUT/ncu_liger.txt
fi
echo "total $(( $(date +%s) - t0 ))s"

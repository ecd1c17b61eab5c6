#!/usr/bin/env bash
# The GPU figures of notebook 07 in one go, on a machine with a CUDA GPU (nothing is downloaded:
# the models are SD 1.5-sized with random weights, the `full-random` profile, at 256 x 256):
#   OUT=results/speed/gpu scripts/gpu_check.sh
# 1. inference, one step and 50: batch 1 and 16, bf16 and fp32, eager and torch.compile
#    (OUT/inference.jsonl, one JSON line each: latency, parts, peak memory);
# 2. training steps in bf16 for throughput and peak memory (OUT/train-step.json);
# 3. the `full` code path end to end: a short full-random training on the toy data, then
#    `syndiff evaluate` of it (OUT/train.log, OUT/evaluate.json): it runs, it is no result.
# PY picks the interpreter (default: the project's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-results/speed/gpu}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TRAIN_STEPS=${TRAIN_STEPS:-200}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/gpu.txt"
git rev-parse --short HEAD >> "$OUT/gpu.txt" 2>/dev/null || true

: > "$OUT/inference.jsonl"
for batch in 1 16; do
  for dtype in bf16 fp32; do
    for compile in "" --compile; do
      echo "inference: batch $batch, $dtype ${compile:-eager}"
      "$PY" -m syndiff_lib bench --random-init full-random --device cuda --batch "$batch" --dtype "$dtype" \
        --steps 1,50 --warmup 3 --repeats 20 $compile --json | tail -n 1 >> "$OUT/inference.jsonl"
    done
  done
done

echo "training: $TRAIN_STEPS steps of each model, bf16"
"$PY" -m syndiff_lib bench --train-step full-random --mixed-precision bf16 --repeats "$TRAIN_STEPS" --warmup 10 --json \
  | tail -n 1 > "$OUT/train-step.json"

echo "the full code path: train $TRAIN_STEPS steps on the toy data, evaluate"
RUN=$(mktemp -d)/full-random
"$PY" -m syndiff_lib train --profile full-random --data toy --max-steps "$TRAIN_STEPS" --val-every "$TRAIN_STEPS" \
  --checkpoint-every "$TRAIN_STEPS" --out "$RUN" > "$OUT/train.log" 2>&1
"$PY" -m syndiff_lib evaluate --checkpoint "$RUN" --data toy --split test --json | tail -n 1 > "$OUT/evaluate.json"
cat "$OUT/evaluate.json"

#!/usr/bin/env bash
# Reproduces bench/evaluate_fold0/ (issue 5): the `ftddm evaluate` report for the shipped default model.
#   1. the 25 synthetic patients of scripts/train_default_model.sh (deterministic for the seed),
#   2. the two comparison models with the default model's training recipe (fold 0, 6000 iterations,
#      batch 8, lr 2e-4, EMA 0.999, bf16, seed 0): a full-chain DDPM (same compact UNet, trained on every
#      index t ∈ [0, 999]; only its UNet is trained since no flow is used when starting from noise) and the
#      one-pass UNet regression baseline. On 2 CPU cores, run side by side with one thread each, each took
#      63 minutes; they checkpoint every 250 iterations: re-run with --resume (as the first argument)
#      to continue interrupted runs,
#   3. the evaluation on an evenly spread subset of the fold's test maps (see the report for its CPU time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -d runs/phantom25 ] || $PY -m ftddm_core.cli phantom --out runs/phantom25 --patients 25 --seed 0
RECIPE=(--data runs/phantom25 --fold 0 --iterations 6000 --batch-size 8 --lr 2e-4 --ema-decay 0.999 --bf16
        --val-every 250 --val-batches 8 --log-every 50 --seed 0 --progress-lines "${1:---force}")
OMP_NUM_THREADS=1 $PY -m ftddm_core.cli train --config compact --t-trunc 999 --stage diffusion \
  --out runs/ddpm_fold0 "${RECIPE[@]}" 2> runs/ddpm_fold0.log & DDPM=$!
OMP_NUM_THREADS=1 $PY -m ftddm_core.cli train --config regression \
  --out runs/reg_fold0 "${RECIPE[@]}" 2> runs/reg_fold0.log & REG=$!
wait $DDPM  # either failure stops the script (set -e)
wait $REG
$PY -m ftddm_core.cli evaluate --data runs/phantom25 --model ftddm_core/weights/ftddm_compact.safetensors \
  --ddpm-model runs/ddpm_fold0/model.safetensors --regression-model runs/reg_fold0/model.safetensors \
  --fold 0 --scales 8,4,2 --max-slices 10 --samples 3 --seed 0 --bf16 --progress-lines \
  --out bench/evaluate_fold0

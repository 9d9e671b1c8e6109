#!/usr/bin/env bash
# Reproduces the committed evaluations of the shipped default model (FTDDM v2):
#   1. bench/evaluate_v2_fold0/: `ftddm evaluate` on fold 0's 10 test patients of runs/invivo50 (made by
#      scripts/train_default_model.sh; 64×64 tiles around the mask centre, 30 maps per scale evenly spread),
#      every method and study, with the full-chain DDPM comparison model runs/ddpm_fold0 trained with the same
#      recipe (scripts/train_default_model.sh); the regression baseline is the model's own SR encoder.
#   2. bench/invivo_kinds.{json,md}: held-out in-vivo-like patients of each kind (rectangular, noisy, 5 mm,
#      mixed; seeds disjoint from any training cohort) on their full slices at F = 2, 3, 4.
# On 2 CPU cores the two ran side by side (one thread each); the report states its compute time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OMP_NUM_THREADS=1 $PY -m ftddm_core.cli evaluate --data runs/invivo50 --ddpm-model runs/ddpm_fold0/model.safetensors \
  --fold 0 --scales 8,4,2 --max-slices 30 --samples 3 --seed 0 \
  --studies calibration --progress-lines --out bench/evaluate_v2_fold0 &
OMP_NUM_THREADS=1 $PY -m bench.invivo_kinds --overwrite --max-maps-per-kind 60 &
wait

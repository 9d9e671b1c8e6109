#!/usr/bin/env bash
# Reproduces the shipped default model ftddm_core/weights/ftddm_compact.safetensors and its model card:
#   1. 25 synthetic patients (deterministic for the seed),
#   2. the compact config on fold 0 (15 train / 5 validation / 5 test patients), bf16 autocast on CPU,
#   3. the held-out benchmark on 2 of the 5 test patients (about 11 minutes; drop --patients for all 5),
#   4. packaging with the model card.
# On 2 CPU cores step 2 took 89 minutes (its log and loss curve: bench/training_compact_fold0/); it checkpoints every 250 iterations: re-run with --resume
# (as the first argument) to continue an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -d runs/phantom25 ] || $PY -m ftddm_core.cli phantom --out runs/phantom25 --patients 25 --seed 0
$PY -m ftddm_core.cli train --data runs/phantom25 --config compact --out runs/compact_fold0 \
  --fold 0 --iterations 6000 --batch-size 8 --lr 2e-4 --flow-lr 2e-4 --ema-decay 0.999 --bf16 \
  --val-every 250 --val-batches 8 --log-every 50 --seed 0 --progress-lines "${1:---force}"
$PY bench/heldout.py --data runs/phantom25 --model runs/compact_fold0/model.safetensors --samples 4 --patients 2
$PY scripts/package_default_model.py --run runs/compact_fold0 --heldout bench/heldout.json

#!/usr/bin/env bash
# Reproduces the committed evaluations of the shipped default model (FTDDM v2):
#   1. bench/evaluate_v2_fold0/: `ftddm evaluate` on fold 0's 10 test patients of runs/invivo50 (made by
#      scripts/train_default_model.sh; 64×64 tiles around the mask centre, 30 maps per scale evenly spread),
#      every method but the 1000-step DDPM chain, and the calibration study; the DDPM baselines use the
#      full-chain comparison model runs/ddpm_fold0 trained with the same recipe; the regression is the model's
#      own SR encoder. About 20 core-minutes.
#   2. bench/evaluate_v2_fold0_ddpm1000/: the 1000-step DDPM chain against the default sampler (about 17
#      core-minutes per scale; the committed one ran one scale per core into one cache, then this command).
#   3. bench/invivo_kinds.{json,md}: held-out in-vivo-like patients of each kind (rectangular, noisy, 5 mm,
#      mixed; seeds disjoint from any training cohort) on their full slices at F = 2, 3, 4 (about 4 minutes).
# On 2 CPU cores they ran side by side with one thread each; the reports state their compute time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DDPM=(--ddpm-model runs/ddpm_fold0/model.safetensors --data runs/invivo50 --fold 0 --max-slices 30 --samples 3
      --seed 0 --progress-lines)
OMP_NUM_THREADS=1 $PY -m ftddm_core.cli evaluate "${DDPM[@]}" --scales 8,4,2 --studies calibration \
  --methods zero_filled,bicubic,regression,flow_only,ddpm_respaced_100,dpmpp_noise_100,dpmpp_sde_noise_100,dpmpp_noise_20,dpmpp_noise_10,ftddm_anc_100,ftddm_anc_50,ftddm_anc_20,ftddm_anc_10,ftddm_dpmpp_50,ftddm_dpmpp_20,ftddm_dpmpp_10,ftddm_dpmpp3m_6,ftddm_dpmpp3m_5 \
  --out bench/evaluate_v2_fold0 &
OMP_NUM_THREADS=1 $PY -m ftddm_core.cli evaluate "${DDPM[@]}" --scales 8,4,2 --studies none \
  --methods ddpm_full,ftddm_anc_10,regression,zero_filled --out bench/evaluate_v2_fold0_ddpm1000 &
wait
OMP_NUM_THREADS=1 $PY -m bench.invivo_kinds --overwrite --max-maps-per-kind 60

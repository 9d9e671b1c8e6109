#!/usr/bin/env bash
# One Slurm array task per participant: `ftddm bids BIDS_DIR OUTPUT_DIR participant --participant-label L`.
#
#   ls -d BIDS_DIR/sub-* | xargs -n1 basename | sed 's/^sub-//' > participants.txt
#   jobid=$(sbatch --parsable --array=1-$(wc -l < participants.txt)%20 \
#           scripts/cohort/slurm_array.sh BIDS_DIR OUTPUT_DIR participants.txt --model my.safetensors)
#   sbatch --dependency=afterany:$jobid --wrap "ftddm bids BIDS_DIR OUTPUT_DIR group"
#
# Arguments after the participants file go to `ftddm bids` unchanged. A re-submitted array skips finished
# sessions; `sacct -j $jobid` shows which tasks exited non-zero (their sessions are named in the task's log).
#SBATCH --job-name=ftddm-bids
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=ftddm-bids-%A_%a.log
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: sbatch --array=1-N $0 BIDS_DIR OUTPUT_DIR PARTICIPANTS_FILE [ftddm bids options]" >&2
    exit 2
fi
bids_dir=$1 output_dir=$2 list=$3
shift 3
: "${SLURM_ARRAY_TASK_ID:?run this script with sbatch --array (SLURM_ARRAY_TASK_ID is not set)}"
label=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$list")
if [ -z "$label" ]; then
    echo "no participant on line $SLURM_ARRAY_TASK_ID of $list" >&2
    exit 2
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# FTDDM can name another launcher (e.g. "python -m ftddm_core.cli", or an apptainer exec line).
${FTDDM:-ftddm} bids "$bids_dir" "$output_dir" participant --participant-label "$label" "$@"

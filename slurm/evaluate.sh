#!/usr/bin/env bash
# slurm/evaluate.sh - compute metrics (FID, IS, ...) of a samples folder; runs after the sample array.
#
#   sbatch --dependency=afterok:<sample array job id> slurm/evaluate.sh \
#          --samples runs/x/samples --reference REF.npz --inception-weights pt_inception.pth --out runs/x/eval
#   (or through slurm/submit_chain.sh ... evaluate: ARGS...)
#
# Every argument goes to `python -m rear_ds.evaluate` unchanged. Inception features that the sample array
# stored for its chunks (slurm/sample.sh with the same Inception weights) are merged, not recomputed.
# Variables (defaults in brackets); also those of slurm/common.sh (REPO_DIR, MODULES, VENV, PRE_RUN, PYTHON):
#   EVALUATE_MODULE  Python module to run                                    [rear_ds.evaluate]
#   DRY_RUN          1 = print the command instead of running it             [0]
# sbatch defaults: override on the command line or with SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT...

#SBATCH --job-name=rear-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#SBATCH --error=slurm-%x-%j.err

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "evaluate.sh: REPO_DIR=$REPO_DIR does not exist" >&2; exit 2; }
REAR_SCRIPT=evaluate.sh
# shellcheck source=slurm/common.sh
source slurm/common.sh

EVALUATE_MODULE=${EVALUATE_MODULE:-rear_ds.evaluate}
[ -f "${EVALUATE_MODULE//.//}.py" ] || rear_die "${EVALUATE_MODULE//.//}.py not found in $REPO_DIR (submit from the repo root or set REPO_DIR)"
rear_setup_env
rear_exec "$PYTHON" -m "$EVALUATE_MODULE" "$@"

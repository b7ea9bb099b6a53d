#!/usr/bin/env bash
# slurm/sample.sh - generate samples as an array job: each array task makes its share of the chunks.
#
#   sbatch --array=0-7 slurm/sample.sh --checkpoint runs/x/checkpoints/latest --config configs/rear_b.yaml \
#          --out-dir runs/x/samples --num-samples 50000 --chunk-size 1000
#   (or through slurm/submit_chain.sh ... sample: ARGS...)
#
# Every argument goes to `python -m rear_ds.sample` unchanged, plus the array position:
#   python -m rear_ds.sample ARGS... --rank $SLURM_ARRAY_TASK_ID --world-size $SLURM_ARRAY_TASK_COUNT
# The tool splits the --num-samples into chunks of --chunk-size and task i makes chunks i, i+n, i+2n, ...;
# per-sample randomness depends only on (seed, sample index), so the result does not depend on the array
# size, and a requeued or re-run task redoes only its own missing chunks. Not an array job: rank 0 of 1.
# One process per array task (an --ntasks>1 job without srun still runs the tool once: it does the task's whole
# share); under `srun` in a task, its processes split the task's share (rear_ds/launch.py).
# With Inception weights (--inception-weights PATH, or REAR_INCEPTION_WEIGHTS, which sbatch passes on) every
# task also stores the Inception features of its chunks (inception/chunk_*.npz): slurm/evaluate.sh then merges
# them instead of running Inception over all samples (chunks without valid features are computed there).
# No --array below: choose the size at submit time (sbatch --array=0-N, or SAMPLE_TASKS in submit_chain.sh).
# Preemption-safe without a checkpoint: chunks are written atomically and a rerun makes only the missing ones. The
# time-limit warning (SIGUSR1, --signal below) stops the sampler (SIGTERM), and a tool exit 75 (an error that may
# pass) does the same; either way this array task requeues itself alone (`scontrol requeue <array>_<task>`, the
# same job id), at most MAX_REQUEUES times. After Slurm's own SIGTERM (scancel, preemption, a lost node) Slurm
# decides: a preempted task is requeued by Slurm (--requeue), a cancelled one stays cancelled.
#
# Variables (defaults in brackets); also those of slurm/common.sh (REPO_DIR, MODULES, VENV, PRE_RUN, PYTHON):
#   SAMPLE_MODULE          Python module to run                                     [rear_ds.sample]
#   RANK_FLAG / WORLD_FLAG flag names that pass the array position        [--rank / --world-size]
#   MAX_REQUEUES           requeue a task at most this often (guards against a loop)          [50]
#   DRY_RUN                1 = print the command instead of running it                        [0]
# sbatch defaults: override on the command line or with SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT...

#SBATCH --job-name=rear-sample
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --error=slurm-%x-%A_%a.err

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "sample.sh: REPO_DIR=$REPO_DIR does not exist" >&2; exit 2; }
REAR_SCRIPT=sample.sh
# shellcheck source=slurm/common.sh
source slurm/common.sh

SAMPLE_MODULE=${SAMPLE_MODULE:-rear_ds.sample}
[ -f "${SAMPLE_MODULE//.//}.py" ] || rear_die "${SAMPLE_MODULE//.//}.py not found in $REPO_DIR (submit from the repo root or set REPO_DIR)"
rear_setup_env
rear_run_requeue_on_75 "$PYTHON" -m "$SAMPLE_MODULE" "$@" \
    "${RANK_FLAG:---rank}" "$(rear_array_rank)" "${WORLD_FLAG:---world-size}" "${SLURM_ARRAY_TASK_COUNT:-1}"

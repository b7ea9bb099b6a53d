#!/usr/bin/env bash
# slurm/tokenize.sh - tokenize images into token shards: an array job over data-prep ranks, then finalize.
#
# One command submits both (array, then finalize with --dependency=afterok):
#   bash slurm/tokenize.sh [TOKENIZE ARGS...]          # = slurm/submit_chain.sh tokenize: ARGS...
#   TOKENIZE_TASKS=16 bash slurm/tokenize.sh --config configs/rear_b.yaml ...
# Or by hand:
#   jid=$(sbatch --parsable --array=0-7 slurm/tokenize.sh ARGS...)
#   sbatch --dependency=afterok:$jid --export=ALL,STAGE=finalize,TOKENIZE_WORLD_SIZE=8 slurm/tokenize.sh ARGS...
#
# Every argument goes to data_prep/tokenize.py unchanged. Array task i of n runs
#   python data_prep/tokenize.py ARGS... --rank i --world-size n
# (not an array job: --rank 0 --world-size 1), and the finalize job runs
#   python data_prep/tokenize.py ARGS... --finalize --world-size n
# which merges the ranks' outputs (manifest, counts). No --array below on purpose: the range is chosen
# at submit time (sbatch --array=0-N or TOKENIZE_TASKS), and the finalize job must not inherit one.
#
# Variables (defaults in brackets); also those of slurm/common.sh (REPO_DIR, MODULES, VENV, PRE_RUN, PYTHON):
#   STAGE                "rank" (array task) or "finalize"                      [rank]
#   TOKENIZE_SCRIPT      data-prep entry point, relative to REPO_DIR           [data_prep/tokenize.py]
#   TOKENIZE_WORLD_SIZE  number of ranks, for the finalize stage              [$SLURM_ARRAY_TASK_COUNT or 1]
#   RANK_FLAG / WORLD_FLAG / FINALIZE_FLAG  flag names of the tool       [--rank / --world-size / --finalize]
#   TOKENIZE_TASKS       array size when this file submits itself (bash slurm/tokenize.sh)  [8]
#   MAX_REQUEUES         a task that exits 75 (transient read error) requeues itself at most this often [50]
#   DRY_RUN              1 = print the command instead of running it                        [0]
# sbatch defaults: override on the command line or with SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT...
# (CPU-only: sbatch --gpus-per-node=0).

#SBATCH --job-name=rear-tokenize
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

if [ -z "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
    # Run by hand, not by sbatch: submit the array and its finalize job.
    exec "$(dirname "${BASH_SOURCE[0]}")/submit_chain.sh" tokenize: "$@"
fi

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "tokenize.sh: REPO_DIR=$REPO_DIR does not exist" >&2; exit 2; }
REAR_SCRIPT=tokenize.sh
# shellcheck source=slurm/common.sh
source slurm/common.sh

TOKENIZE_SCRIPT=${TOKENIZE_SCRIPT:-data_prep/tokenize.py}
[ -f "$TOKENIZE_SCRIPT" ] || rear_die "$TOKENIZE_SCRIPT not found in $REPO_DIR (submit from the repo root or set REPO_DIR)"
rear_setup_env

case "${STAGE:-rank}" in
    rank)
        # Exit 75: an input stayed unreadable with an error that may pass (EIO, ESTALE, ...) and the rank stopped
        # before committing that shard; or the time-limit warning (SIGUSR1) stopped it: requeue the task; its
        # rerun skips the shards already committed.
        rear_run_requeue_on_75 "$PYTHON" "$TOKENIZE_SCRIPT" "$@" \
            "${RANK_FLAG:---rank}" "$(rear_array_rank)" "${WORLD_FLAG:---world-size}" "${SLURM_ARRAY_TASK_COUNT:-1}"
        ;;
    finalize)
        rear_exec "$PYTHON" "$TOKENIZE_SCRIPT" "$@" \
            "${FINALIZE_FLAG:---finalize}" "${WORLD_FLAG:---world-size}" "${TOKENIZE_WORLD_SIZE:-${SLURM_ARRAY_TASK_COUNT:-1}}"
        ;;
    *) rear_die "STAGE=${STAGE} (expected rank or finalize)" ;;
esac

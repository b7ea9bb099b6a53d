#!/usr/bin/env bash
# slurm/common.sh - shared by slurm/train.sh, tokenize.sh, sample.sh and evaluate.sh (sourced, not run).
#
# Slurm runs a copy of each batch script from its spool folder, so the scripts find the repository
# through $SLURM_SUBMIT_DIR (submit from the repo root) or REPO_DIR, and source this file from there.
# Variables (defaults in brackets):
#   REPO_DIR  repository root                                    [$SLURM_SUBMIT_DIR, else $PWD]
#   MODULES   space-separated environment modules to `module load`            [none]
#   VENV      folder whose bin/activate is sourced (virtualenv)               [none]
#   PRE_RUN   shell code eval'ed before the tool starts (e.g. "conda activate rear") [none]
#   PYTHON    Python interpreter                                              [python]
#   MAX_REQUEUES  stop requeueing a job after this many restarts (guards against a loop) [50]

rear_log() { echo "[$(basename "${REAR_SCRIPT:-slurm}") $(date '+%F %T')] $*" >&2; }
rear_die() { echo "[$(basename "${REAR_SCRIPT:-slurm}")] ERROR: $*" >&2; exit 2; }

# Load modules / venv / PRE_RUN. Their init scripts often read unset variables: relax -u meanwhile.
rear_setup_env() {
    local init
    set +u
    if [ -n "${MODULES:-}" ]; then
        if ! type module >/dev/null 2>&1; then
            for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
                # shellcheck disable=SC1090
                if [ -f "$init" ]; then source "$init"; break; fi
            done
        fi
        # shellcheck disable=SC2086  # a list of module names
        module load $MODULES
    fi
    if [ -n "${VENV:-}" ]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    if [ -n "${PRE_RUN:-}" ]; then eval "$PRE_RUN"; fi
    set -u
    PYTHON=${PYTHON:-python}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

rear_show() { # the command about to run; DRY_RUN=1 prints it and exits
    rear_log "job ${SLURM_JOB_ID:-none} array ${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-} on $(hostname -s): $(printf '%q ' "$@")"
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "dry run: $(printf '%q ' "$@")"; exit 0; fi
}

# Print the command, then run it in the foreground (exec: the tool gets Slurm's signals directly).
rear_exec() {
    rear_show "$@"
    exec "$@"
}

# Print the command and run it; exit 75 (EX_TEMPFAIL: stopped by a fault that may pass, nothing half-written)
# requeues this job or array task (rear_requeue), any other status is the job's.
rear_run_requeue_on_75() {
    local rc=0
    rear_show "$@"
    "$@" || rc=$?
    if [ "$rc" = 75 ]; then rear_requeue "exit 75"; fi
    exit "$rc"
}

# Requeue this job with the same job id, then exit 0; a job requeued MAX_REQUEUES [50] times already exits 75
# instead (no endless loop). An array task requeues only itself: named by its own SLURM_JOB_ID, the array's
# last task would requeue the whole array (its job id is the array's), finished tasks included.
rear_requeue() { # WHY
    local restarts=${SLURM_RESTART_COUNT:-0} id=$SLURM_JOB_ID
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi
    if [ "$restarts" -ge "${MAX_REQUEUES:-50}" ]; then
        rear_log "$1, but this job was already requeued $restarts times (MAX_REQUEUES): not requeueing"
        exit 75
    fi
    rear_log "$1: requeueing job $id"
    scontrol requeue "$id"
    exit 0
}

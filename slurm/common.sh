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
#   REQUEUE_TRIES / REQUEUE_RETRY_S  attempts at `scontrol requeue`, seconds between them     [3 / 10]

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

# Rank of this array task within the array, also for a stepped range (--array=0-14:2 -> 0..7); 0 outside an array.
# A list (--array=1,5,9) has no evenly spaced ids: the tool's own parser (rear_ds/launch.py) names it.
rear_array_rank() {
    echo $(( (${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1} ))
}

# Signals of the batch shell (set by rear_trap_signals). SIGUSR1 is the time-limit / preemption warning
# (sbatch --signal=B:USR1@N): it is passed on to the running tool $REAR_CHILD as REAR_STOP_SIGNAL [TERM].
# SIGTERM comes from Slurm (scancel, preemption, `scontrol requeue`, a lost node), which signals the tool itself:
# only wait for it (and, when Slurm requeued the job, lower its task count: rear_set_num_tasks).
REAR_GOT_USR1=0 REAR_GOT_TERM=0 REAR_SIGNALLED=0 REAR_CHILD=""
# shellcheck disable=SC2317  # reached through trap
rear_on_usr1() {
    REAR_GOT_USR1=1 REAR_SIGNALLED=1
    rear_log "SIGUSR1 (time limit / preemption warning): asking ${REAR_CHILD:+pid $REAR_CHILD }to stop"
    if [ -n "$REAR_CHILD" ]; then kill -"${REAR_STOP_SIGNAL:-TERM}" "$REAR_CHILD" 2>/dev/null || true; fi
}
# shellcheck disable=SC2317
rear_on_term() {
    REAR_GOT_TERM=1 REAR_SIGNALLED=1
    rear_log "SIGTERM: the job is being cancelled, preempted or requeued by Slurm; waiting for the tool"
    if [ -n "${REAR_NUM_TASKS:-}" ]; then rear_set_num_tasks "$REAR_NUM_TASKS"; fi
}
rear_trap_signals() { trap rear_on_usr1 USR1; trap rear_on_term TERM; }

# Wait for the background process $REAR_CHILD; its exit status in REAR_RC. A SIGUSR1 that came before the child
# existed is passed on now. `wait` returns early (>128) when a trapped signal arrives: then wait again.
rear_wait_child() {
    if [ "$REAR_GOT_USR1" = 1 ]; then kill -"${REAR_STOP_SIGNAL:-TERM}" "$REAR_CHILD" 2>/dev/null || true; fi
    while :; do
        REAR_RC=0
        wait "$REAR_CHILD" || REAR_RC=$?
        if [ "$REAR_SIGNALLED" = 1 ] && [ "$REAR_RC" -gt 128 ]; then REAR_SIGNALLED=0; continue; fi
        break
    done
}

# Print the command and run it; exit 75 (EX_TEMPFAIL: stopped by a fault that may pass, nothing half-written)
# requeues this job or array task (rear_requeue), any other status is the job's. The time-limit warning
# (SIGUSR1) stops the tool with SIGTERM: these tools write each output atomically and a rerun redoes only what is
# missing, so a tool stopped that way (143, or 75 if it handles SIGTERM) is requeued the same way. After Slurm's
# own SIGTERM nothing is requeued here: Slurm requeues or cancels the job itself.
rear_run_requeue_on_75() {
    rear_show "$@"
    rear_trap_signals
    "$@" &
    REAR_CHILD=$!
    rear_wait_child
    local rc=$REAR_RC
    if [ "$REAR_GOT_USR1" = 1 ] && [ "$rc" = 143 ]; then
        rear_log "stopped by the SIGTERM sent after SIGUSR1 (exit 143): treated as 75"
        rc=75
    fi
    if [ "$rc" = 75 ] && [ "$REAR_GOT_TERM" = 0 ]; then
        rear_requeue "exit 75$([ "$REAR_GOT_USR1" = 1 ] && echo ' after SIGUSR1')"
    fi
    exit "$rc"
}

# What a requeued job asks for when it starts again: N tasks. Slurm keeps the task count of the job's last
# allocation across a requeue (22.05: `--nodes=1-2 --ntasks-per-node=2` on two nodes becomes NumTasks=4), so a job
# with a node range would wait for a lost node for ever; lowered to one node's tasks, it starts on the nodes there
# are (the next allocation sets nodes x --ntasks-per-node again). Only a pending job can be updated: after a
# scancel or a time-out this fails, which is right.
rear_set_num_tasks() { # N
    if scontrol update "jobid=$SLURM_JOB_ID" "NumTasks=$1" 2>/dev/null; then
        rear_log "requeued: the job asks for $1 tasks (one node's) again, so it starts on the nodes that are up"
    fi
}

# Requeue this job with the same job id, then exit 0; a job requeued MAX_REQUEUES [50] times already exits 75
# instead (no endless loop). An array task requeues only itself: named by its own SLURM_JOB_ID, the array's
# last task would requeue the whole array (its job id is the array's), finished tasks included. The controller may
# be briefly unreachable (a restart, a fail-over): tried REQUEUE_TRIES [3] times, REQUEUE_RETRY_S [10] s apart,
# then exit 75 with what to do (the checkpoint/outputs are complete: a resubmission resumes).
rear_requeue() { # WHY
    local restarts=${SLURM_RESTART_COUNT:-0} id=$SLURM_JOB_ID try
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi
    if [ "$restarts" -ge "${MAX_REQUEUES:-50}" ]; then
        rear_log "$1, but this job was already requeued $restarts times (MAX_REQUEUES): not requeueing"
        exit 75
    fi
    rear_log "$1: requeueing job $id"
    for ((try = 1; try <= ${REQUEUE_TRIES:-3}; try++)); do
        if scontrol requeue "$id"; then
            if [ -n "${REAR_NUM_TASKS:-}" ]; then rear_set_num_tasks "$REAR_NUM_TASKS"; fi
            exit 0
        fi
        if [ "$try" -lt "${REQUEUE_TRIES:-3}" ]; then sleep "${REQUEUE_RETRY_S:-10}"; fi
    done
    rear_log "ERROR: scontrol requeue $id failed ${REQUEUE_TRIES:-3} times: not requeued; nothing is lost, resubmit" \
        "the same command (same RUN_DIR / --out-dir) to continue"
    exit 75
}

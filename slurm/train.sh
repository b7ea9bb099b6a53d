#!/usr/bin/env bash
# slurm/train.sh - train reAR with DeepSpeed on any number of Slurm nodes; preemption-safe.
#
#   sbatch [sbatch flags] slurm/train.sh [--config configs/x.yaml] [--deepspeed_config ds_configs/y.json]
#                                        [--dry-run] [section.key=value ...]
#   DRY_RUN=1 bash slurm/train.sh ...      # print the resolved plan outside (or inside) a job, start nothing
#
# Submit from the repository root (Slurm runs a copy of this file, so the repo is found through
# $SLURM_SUBMIT_DIR), or set REPO_DIR. Every argument that is not one of the options above is passed
# to rear_ds/train.py unchanged (k=v config overrides). Examples:
#   sbatch --nodes=4 slurm/train.sh --config configs/rear_b.yaml train.max_steps=250000
#   sbatch -p gpu -A myproj --time=2-00:00:00 slurm/train.sh --config configs/rear_l.yaml
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/train.sh --config ...   # CPU only
# --time must be well above the 600 s warning (--signal=B:USR1@600), or the job is told to stop at once.
#
# Launch model: `srun` starts ONE PROCESS PER GPU (no torchrun/deepspeed launcher, no ssh, no hostfile).
# Each process gets RANK=$SLURM_PROCID, LOCAL_RANK=$SLURM_LOCALID, WORLD_SIZE=$SLURM_NTASKS,
# MASTER_ADDR (first node of the allocation) and MASTER_PORT (derived from the job id, so two jobs that
# share a node do not collide); DeepSpeed's init_distributed reads those. The processes of a node agree at
# start-up on one GPU each among those they see, so any binding works: all GPUs visible (cuda:LOCAL_RANK),
# one per task (--gpus-per-task=1, --gpu-bind=single:1: cuda:0), or a socket's GPUs (--gpu-bind=closest).
# Why not one torchrun per node: srun then owns every rank, so Slurm's signals, --kill-on-bad-exit semantics
# and per-rank accounting apply to the real training processes.
#
# Preemption / time limit: Slurm sends SIGUSR1 to this batch shell (--signal=B:USR1@600, ten minutes before
# the time limit); the shell forwards it to the srun step; training writes a checkpoint and exits 75; the
# shell then runs `scontrol requeue $SLURM_JOB_ID`. The requeued job keeps its job id, so the output/error
# files (opened in append mode), the run folder (runs/slurm-<job id>) and the W&B id stored in it are the
# same, and training resumes from <run dir>/checkpoints/latest by itself. On SIGTERM (scancel, preemption,
# `scontrol requeue` from outside) Slurm signals the training processes itself; this shell waits for them
# and does not requeue (Slurm decides). KillWait on the cluster must leave time to write a checkpoint.
# Lost node: Slurm requeues the job (--requeue) but keeps the task count of its last allocation, so with a node
# range (sbatch --nodes=2-4) the requeued job would wait for the lost node; this shell lowers the pending job's
# count to one node's tasks (`scontrol update jobid=<job> NumTasks=<tasks per node>`, also after its own
# requeue), and the job starts again on the nodes that are up: another world size, resumed through the universal
# checkpoint. A fixed --nodes=N gets N nodes again (Slurm sets nodes x tasks per node at each allocation).
#
# #SBATCH defaults below; override any of them on the sbatch command line (--nodes=4, --time=..) or with
# Slurm's own input variables, which is how partition/account are chosen (never hard-coded here):
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, SBATCH_CONSTRAINT
#   (or -p/--partition, -A/--account, ...). Precedence: command line > SBATCH_* variables > #SBATCH lines.
#
# Variables read at run time (sbatch exports the submitting shell's environment; defaults in brackets):
#   CONFIG           model/training YAML if --config is not given                   [required]
#   DS_CONFIG        DeepSpeed JSON if --deepspeed_config is not given        [ds_configs/zero2_bf16.json]
#   RUN_DIR          run folder, passed as train.out_dir; keep it stable across requeues
#                    [runs/slurm-$SLURM_JOB_ID]; a train.out_dir=... argument wins over it
#   REPO_DIR         repository root                     [$SLURM_SUBMIT_DIR; outside a job: this file's ..]
#   GPUS_PER_NODE    processes per node in GPU mode  [$SLURM_GPUS_ON_NODE, else --gpus-per-node, else 0]
#                    0 = CPU mode: NTASKS_PER_NODE processes per node (gloo backend, for tests/debugging)
#   NTASKS_PER_NODE  processes per node in CPU mode   [$SLURM_NTASKS_PER_NODE, else ntasks/nodes, else 1]
#   MODULES          space-separated environment modules to `module load` first   [none]
#   VENV             virtualenv/conda-prefix folder whose bin/activate is sourced  [none]
#   PRE_RUN          shell code eval'ed just before launching (e.g. "conda activate rear") [none]
#   PYTHON           Python interpreter                                           [python]
#   TRAIN_SCRIPT     training entry point, relative to REPO_DIR                   [rear_ds/train.py]
#   MASTER_PORT      rendezvous port                          [20000 + SLURM_JOB_ID % 12000]
#   OMP_NUM_THREADS  threads per process                          [$SLURM_CPUS_PER_TASK, else 1]
#   STEP_EXIT_WAIT   seconds srun lets the other ranks run after the first one exits, then kills
#                    them (a crashed rank must not leave the others hanging)     [300]
#   MAX_REQUEUES     stop requeueing after this many restarts (guards against a loop) [50]
#   DRY_RUN          1 = print nodes, world size, per-GPU batch and the exact command; start nothing [0]
#
# Exit status: the training step's (0 done, 75 checkpointed and stopped, 1 error; a non-zero status after the
# run log's final "finished" / "stop" event counts as 0 / 75); 0 after a self-requeue; 2 for a bad setup found
# before launching (missing config, tasks/GPUs mismatch, ...).

#SBATCH --job-name=rear-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#SBATCH --error=slurm-%x-%j.err

set -euo pipefail

log() { echo "[train.sh $(date '+%F %T')] $*" >&2; }
die() { echo "[train.sh] ERROR: $*" >&2; exit 2; }

# ---------------------------------------------------------------- arguments
CONFIG=${CONFIG:-}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}
DRY_RUN=${DRY_RUN:-0}
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) [ $# -ge 2 ] || die "--config needs a value"; CONFIG=$2; shift 2 ;;
        --config=*) CONFIG=${1#*=}; shift ;;
        --deepspeed_config | --deepspeed-config) [ $# -ge 2 ] || die "$1 needs a value"; DS_CONFIG=$2; shift 2 ;;
        --deepspeed_config=* | --deepspeed-config=*) DS_CONFIG=${1#*=}; shift ;;
        --dry-run | --dry_run) DRY_RUN=1; shift ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

# ---------------------------------------------------------------- repository and run folder
if [ -n "${SLURM_JOB_ID:-}" ]; then
    REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
else
    REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
cd "$REPO_DIR" || die "REPO_DIR=$REPO_DIR does not exist"
PYTHON=${PYTHON:-python}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-rear_ds/train.py}

[ -n "$CONFIG" ] || die "no config: pass --config configs/<x>.yaml (or set CONFIG)"
[ -f "$CONFIG" ] || die "config $CONFIG not found in $REPO_DIR (submit from the repo root or set REPO_DIR)"
[ -f "$DS_CONFIG" ] || die "DeepSpeed config $DS_CONFIG not found in $REPO_DIR"
[ -f "$TRAIN_SCRIPT" ] || [ "$DRY_RUN" = 1 ] || die "$TRAIN_SCRIPT not found in $REPO_DIR (set REPO_DIR)"

# A train.out_dir override on the command line names the run folder; otherwise RUN_DIR does.
USER_OUT_DIR=""
for arg in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    case "$arg" in train.out_dir=*) USER_OUT_DIR=${arg#train.out_dir=} ;; esac
done
if [ -n "$USER_OUT_DIR" ]; then
    RUN_DIR=$USER_OUT_DIR
else
    RUN_DIR=${RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-dryrun}}
    OVERRIDES=("train.out_dir=$RUN_DIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
fi

# ---------------------------------------------------------------- allocation -> world size
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [ ${#NODES[@]} -gt 0 ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed nothing"
else
    NODES=("$(hostname -s)")   # dry run outside a job
fi
NNODES=${SLURM_NNODES:-${#NODES[@]}}
[ "$NNODES" = "${#NODES[@]}" ] || die "SLURM_NNODES=$NNODES but the node list has ${#NODES[@]} nodes"
MASTER_ADDR=${NODES[0]}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 12000))}  # below the ephemeral range (32768+)

gpus_default=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus_default=${gpus_default##*:}   # --gpus-per-node=a100:8 -> 8
GPUS_PER_NODE=${GPUS_PER_NODE:-$gpus_default}
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE='$GPUS_PER_NODE' is not a number"
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    DEVICE=gpu
    PER_NODE=$GPUS_PER_NODE
    # One process per GPU: a different --ntasks-per-node would silently change the world size.
    if [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "$SLURM_NTASKS_PER_NODE" != "$PER_NODE" ]; then
        die "--ntasks-per-node=$SLURM_NTASKS_PER_NODE but $PER_NODE GPUs per node: make them equal" \
            "(sbatch --ntasks-per-node=$PER_NODE, or set GPUS_PER_NODE)"
    fi
else
    DEVICE=cpu
    if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
        per_node_default=$SLURM_NTASKS_PER_NODE
    elif [ -n "${SLURM_NTASKS:-}" ]; then
        # --ntasks=3 on 2 nodes has no equal share per node: one process per node would silently drop a task
        [ $((SLURM_NTASKS % NNODES)) = 0 ] || [ -n "${NTASKS_PER_NODE:-}" ] \
            || die "SLURM_NTASKS=$SLURM_NTASKS tasks on $NNODES nodes is no equal number per node: submit with" \
                "--ntasks-per-node (or set NTASKS_PER_NODE)"
        per_node_default=$((SLURM_NTASKS / NNODES))
    else
        per_node_default=1
    fi
    PER_NODE=${NTASKS_PER_NODE:-$per_node_default}
fi
WORLD_SIZE=$((NNODES * PER_NODE))
if [ -n "${SLURM_NTASKS:-}" ] && [ "$WORLD_SIZE" -gt "$SLURM_NTASKS" ]; then
    die "world size $WORLD_SIZE ($NNODES nodes x $PER_NODE) exceeds the job's $SLURM_NTASKS tasks"
fi
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
export MASTER_ADDR MASTER_PORT
# The address the rendezvous goes to, as this (the first) node resolves its name. gloo binds each process to
# the address its host name resolves to: a loopback one (a "127.0.1.1 <host>" line in /etc/hosts) cannot be
# reached from the other nodes.
MASTER_IP=$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk '{print $1; exit}' || true)
if [ "$DEVICE" = cpu ] && [ "$NNODES" -gt 1 ] && [[ "$MASTER_IP" == 127.* ]]; then
    log "WARNING: $MASTER_ADDR resolves to $MASTER_IP (loopback) on itself: gloo processes on the other nodes will" \
        "not reach it; map the node names to their network addresses in /etc/hosts or set GLOO_SOCKET_IFNAME"
fi

# ---------------------------------------------------------------- environment
# MODULES / VENV / PRE_RUN, loaded the same way as in the other scripts (slurm/common.sh), before the
# first use of $PYTHON below.
REAR_SCRIPT=train.sh
# shellcheck source=slurm/common.sh
source slurm/common.sh
# From here a SIGUSR1 (time-limit warning) is handled (below), not the end of this shell.
# A requeued job asks for one node's tasks again (REAR_NUM_TASKS), so that after a lost node it starts on those
# that are left; SIGUSR1 goes to srun, which relays it to every task of the step.
REAR_STOP_SIGNAL=USR1
REAR_NUM_TASKS=${SLURM_NTASKS_PER_NODE:-}
rear_trap_signals
rear_setup_env

# Per-GPU batch from the resolved config (the same loader training uses), which also rejects a
# broken config now instead of after every node has started.
batch_info=$(PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$CONFIG" "$WORLD_SIZE" \
    "${OVERRIDES[@]}" <<'EOF'
import sys
from rear_ds.config import load_config
from rear_ds.training.ds_config import pin_global_batch
cfg = load_config(sys.argv[1], sys.argv[3:])
t, world = cfg.train, int(sys.argv[2])
pin_global_batch(cfg, world)
print(f"{t.micro_batch_size} (grad_accum {t.grad_accum}, global batch "
      f"{t.micro_batch_size * t.grad_accum * world}, max_steps {t.max_steps})")
EOF
) || die "config $CONFIG with overrides ${OVERRIDES[*]} does not load (see above)"

# ---------------------------------------------------------------- command
# bash -c maps Slurm's per-task ids to the torch.distributed variables, then execs python so the
# training process itself receives the signals srun forwards.
SRUN=(srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$PER_NODE"
      --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=0 --wait="${STEP_EXIT_WAIT:-300}")
# shellcheck disable=SC2016  # expanded by the task's shell, not here
TASK=(bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank)
TRAIN=("$PYTHON" "$TRAIN_SCRIPT" --deepspeed_config "$DS_CONFIG" --config "$CONFIG" "${OVERRIDES[@]}")

cat <<EOF
==== slurm/train.sh  job ${SLURM_JOB_ID:-none}  restart ${SLURM_RESTART_COUNT:-0}  $(date '+%F %T')
nodes: $NNODES (${NODES[*]})
master address: $MASTER_ADDR:$MASTER_PORT${MASTER_IP:+ ($MASTER_IP)}
world size: $WORLD_SIZE ($NNODES nodes x $PER_NODE processes per node, $DEVICE)
per-GPU batch: $batch_info
cpus per task: $CPUS_PER_TASK (OMP_NUM_THREADS=$OMP_NUM_THREADS)
run dir: $RUN_DIR
repo: $REPO_DIR
environment: modules='${MODULES:-}' venv='${VENV:-}' pre_run='${PRE_RUN:-}'
command: $(printf '%q ' "${SRUN[@]}" "${TASK[@]}" "${TRAIN[@]}")
EOF

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: nothing started"
    exit 0
fi
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch (or use DRY_RUN=1)"


# ---------------------------------------------------------------- run, forward signals, requeue
# Where this launch's records start in the run log: its final event tells what training did, whatever the
# exit status of its teardown says (see below).
RUN_LOG="$RUN_DIR/log.jsonl"
log_start=$(stat -c %s "$RUN_LOG" 2>/dev/null || echo 0)

# A signal while this shell started up: nothing to checkpoint yet (and srun may not relay a signal this early).
if [ "$REAR_GOT_TERM" = 1 ]; then log "SIGTERM before training started: not starting it"; exit 143; fi
if [ "$REAR_GOT_USR1" = 1 ]; then rear_requeue "SIGUSR1 before training started (the last checkpoint stands)"; fi
"${SRUN[@]}" "${TASK[@]}" "${TRAIN[@]}" &
REAR_CHILD=$!
rear_wait_child
rc=$REAR_RC
log "training step exited with $rc"

# Training writes {"event": "stop"} after its preemption checkpoint and {"event": "finished"} after its final
# one, each right before its last collective. A process that dies after that point (an abort in its teardown:
# srun reports 134) must not end the requeue chain or fail a finished job.
last_event=$(tail -c +"$((log_start + 1))" "$RUN_LOG" 2>/dev/null | grep -o '"event": "[a-z]*"' | tail -n 1 || true)
if [ "$rc" != 0 ] && [ "$rc" != 75 ]; then
    case "$last_event" in
        *'"stop"') log "exit $rc after the run log's final 'stop' event (checkpoint written): treated as 75"; rc=75 ;;
        *'"finished"') log "exit $rc after the run log's final 'finished' event: treated as 0"; rc=0 ;;
    esac
fi

if [ "$rc" = 75 ] && [ "$REAR_GOT_TERM" = 0 ]; then
    rear_requeue "checkpoint written (exit 75$([ "$REAR_GOT_USR1" = 1 ] && echo ' after SIGUSR1'))"
fi
exit "$rc"

#!/usr/bin/env bash
# slurm/submit_chain.sh - submit tokenize -> finalize -> train -> sample -> evaluate (or any subset, in
# that order) as Slurm jobs chained with --dependency=afterok, and print their job ids.
#
#   slurm/submit_chain.sh \
#       tokenize: --config configs/rear_b.yaml --input /data/imagenet/train --out data/shards \
#       train:    --config configs/rear_b.yaml --deepspeed_config ds_configs/zero2_bf16.json data.shards=data/shards \
#       sample:   --config configs/rear_b.yaml --out-dir runs/rear_b/samples --num-samples 50000 \
#       evaluate: --reference ref/VIRTUAL_imagenet256.npz --inception-weights ref/pt_inception.pth --out runs/rear_b/eval
#
# Run it from any folder (job logs go there). A word "tokenize:", "train:", "sample:" or "evaluate:" starts the
# arguments of that stage (passed unchanged to slurm/<stage>.sh, i.e. to the Python tool); stages not named
# are skipped. "tokenize:" submits the array AND its finalize job. Each job starts only if the previous
# one succeeded (a requeued training job counts once it finally completes). Wiring done for you:
#   train    gets train.out_dir=$RUN_DIR unless its arguments set train.out_dir;
#   sample   gets --checkpoint $RUN_DIR/checkpoints/latest if train is in the chain and no --checkpoint given,
#            and evaluate's --inception-weights (its tasks store their chunks' Inception features) if it has none;
#   evaluate gets --samples <sample's --out-dir> if sample is in the chain and no --samples given.
#
# Variables (defaults in brackets):
#   PARTITION, ACCOUNT, QOS   passed to every sbatch as -p / -A / --qos              [cluster default]
#   SBATCH_EXTRA              more sbatch flags for every job (word-split), e.g. "--gpus-per-node=0" [none]
#   TOKENIZE_SBATCH, FINALIZE_SBATCH, TRAIN_SBATCH, SAMPLE_SBATCH, EVALUATE_SBATCH
#                             sbatch flags for one stage only, e.g. TRAIN_SBATCH="--nodes=4"      [none]
#   TOKENIZE_TASKS            array size of the tokenize stage                        [8]
#   SAMPLE_TASKS              array size of the sample stage                          [8]
#   RUN_DIR                   training run folder                        [runs/chain-<date>-<time>]
#   DEPEND_ON                 job id the first stage waits for (afterok)              [none]
#   REPO_DIR                  repository the jobs run in                  [this file's ..]
#   DRY_RUN                   1 = print the sbatch commands, submit nothing           [0]
# Everything else (MODULES, VENV, PRE_RUN, PYTHON, GPUS_PER_NODE, ...) reaches the jobs through sbatch's
# default --export=ALL. Output: one line "<stage> <job id>" per submitted job, on stdout.
set -euo pipefail

die() { echo "submit_chain.sh: ERROR: $*" >&2; exit 2; }
# The jobs find the repository through REPO_DIR (exported to them), so this can run from any folder;
# the slurm-*.out/.err files land in the current folder.
SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export REPO_DIR=${REPO_DIR:-$(dirname "$SLURM_DIR")}

TOKENIZE_ARGS=() TRAIN_ARGS=() SAMPLE_ARGS=() EVALUATE_ARGS=()
HAVE_TOKENIZE=0 HAVE_TRAIN=0 HAVE_SAMPLE=0 HAVE_EVALUATE=0
stage=""
for arg in "$@"; do
    case "$arg" in
        tokenize:) stage=tokenize; HAVE_TOKENIZE=1; continue ;;
        train:) stage=train; HAVE_TRAIN=1; continue ;;
        sample:) stage=sample; HAVE_SAMPLE=1; continue ;;
        evaluate:) stage=evaluate; HAVE_EVALUATE=1; continue ;;
    esac
    case "$stage" in
        tokenize) TOKENIZE_ARGS+=("$arg") ;;
        train) TRAIN_ARGS+=("$arg") ;;
        sample) SAMPLE_ARGS+=("$arg") ;;
        evaluate) EVALUATE_ARGS+=("$arg") ;;
        *) die "argument '$arg' before any stage word (tokenize: train: sample: evaluate:)" ;;
    esac
done
[ $((HAVE_TOKENIZE + HAVE_TRAIN + HAVE_SAMPLE + HAVE_EVALUATE)) -gt 0 ] \
    || die "no stage given; usage: $0 [tokenize: ARGS] [train: ARGS] [sample: ARGS] [evaluate: ARGS]"

COMMON=(--parsable)
[ -n "${PARTITION:-}" ] && COMMON+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && COMMON+=(--account="$ACCOUNT")
[ -n "${QOS:-}" ] && COMMON+=(--qos="$QOS")
# shellcheck disable=SC2206  # word-splitting of user-given flag lists is intended
COMMON+=(${SBATCH_EXTRA:-})

LAST=${DEPEND_ON:-}
# submit STAGE_NAME EXTRA_FLAGS_STRING sbatch-args... : sets LAST to the new job id
submit() {
    local name=$1 extra=$2 id
    shift 2
    local cmd=(sbatch "${COMMON[@]}")
    # shellcheck disable=SC2206
    cmd+=($extra)
    [ -n "$LAST" ] && cmd+=(--dependency="afterok:$LAST" --kill-on-invalid-dep=yes)
    cmd+=("$@")
    if [ "${DRY_RUN:-0}" = 1 ]; then
        echo "dry run: $(printf '%q ' "${cmd[@]}")" >&2
        id="DRY_$name"
    else
        id=$("${cmd[@]}") || die "sbatch failed for stage $name: $(printf '%q ' "${cmd[@]}")"
        id=${id%%;*}   # --parsable prints "id" or "id;cluster"
    fi
    echo "$name $id"
    LAST=$id
}

has_flag() { # FLAG ARGS... : is --flag or --flag=... among ARGS?
    local f=$1 a
    shift
    for a in "$@"; do case "$a" in "$f" | "$f="*) return 0 ;; esac; done
    return 1
}
flag_value() { # FLAG ARGS... : print the value of --flag V or --flag=V
    local f=$1
    shift
    while [ $# -gt 0 ]; do
        case "$1" in
            "$f") echo "${2:-}"; return 0 ;;
            "$f="*) echo "${1#*=}"; return 0 ;;
        esac
        shift
    done
    return 1
}

if [ $HAVE_TOKENIZE = 1 ]; then
    n=${TOKENIZE_TASKS:-8}
    submit tokenize "${TOKENIZE_SBATCH:-}" --array="0-$((n - 1))" \
        "$SLURM_DIR/tokenize.sh" "${TOKENIZE_ARGS[@]+"${TOKENIZE_ARGS[@]}"}"
    submit finalize "${FINALIZE_SBATCH:-}" --job-name=rear-tokenize-finalize \
        --output=slurm-%x-%j.out --error=slurm-%x-%j.err \
        --export="ALL,STAGE=finalize,TOKENIZE_WORLD_SIZE=$n" \
        "$SLURM_DIR/tokenize.sh" "${TOKENIZE_ARGS[@]+"${TOKENIZE_ARGS[@]}"}"
fi

if [ $HAVE_TRAIN = 1 ]; then
    for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do
        case "$a" in train.out_dir=*) RUN_DIR=${a#train.out_dir=} ;; esac
    done
    RUN_DIR=${RUN_DIR:-runs/chain-$(date +%Y%m%d-%H%M%S)}
    echo "run dir: $RUN_DIR" >&2
    submit train "${TRAIN_SBATCH:-}" "$SLURM_DIR/train.sh" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}" "train.out_dir=$RUN_DIR"
fi

if [ $HAVE_SAMPLE = 1 ]; then
    if [ $HAVE_TRAIN = 1 ] && ! has_flag --checkpoint "${SAMPLE_ARGS[@]+"${SAMPLE_ARGS[@]}"}"; then
        SAMPLE_ARGS+=(--checkpoint "$RUN_DIR/checkpoints/latest")
    fi
    # the array tasks also compute their chunks' Inception features: evaluate then only merges them
    if w=$(flag_value --inception-weights "${EVALUATE_ARGS[@]+"${EVALUATE_ARGS[@]}"}") \
        && ! has_flag --inception-weights "${SAMPLE_ARGS[@]+"${SAMPLE_ARGS[@]}"}"; then
        SAMPLE_ARGS+=(--inception-weights "$w")
    fi
    n=${SAMPLE_TASKS:-8}
    submit sample "${SAMPLE_SBATCH:-}" --array="0-$((n - 1))" \
        "$SLURM_DIR/sample.sh" "${SAMPLE_ARGS[@]+"${SAMPLE_ARGS[@]}"}"
fi

if [ $HAVE_EVALUATE = 1 ]; then
    if [ $HAVE_SAMPLE = 1 ] && ! has_flag --samples "${EVALUATE_ARGS[@]+"${EVALUATE_ARGS[@]}"}"; then
        out=$(flag_value --out-dir "${SAMPLE_ARGS[@]+"${SAMPLE_ARGS[@]}"}") \
            || die "sample: needs --out-dir (evaluate: reads the samples from it)"
        EVALUATE_ARGS+=(--samples "$out")
    fi
    submit evaluate "${EVALUATE_SBATCH:-}" "$SLURM_DIR/evaluate.sh" "${EVALUATE_ARGS[@]+"${EVALUATE_ARGS[@]}"}"
fi

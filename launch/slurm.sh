#!/usr/bin/env bash
# Multi-node fine-tuning on SLURM: one `accelerate launch` per node, each starting one worker per GPU.
#
#   sbatch --nodes 4 launch/slurm.sh glue-mrpc --output_dir /shared/runs/mrpc
#
# Submit from the repository root (paths below are relative to it; SLURM runs a spooled copy of this
# file, so the script cannot find the repository from its own location). Everything after the script
# name goes to `finetune train`. sbatch options given on the command line override the #SBATCH lines.
#
# Settings read from the environment (sbatch passes the submitting shell's environment through):
#   LAUNCH_CONFIG      accelerate config, default launch/multi_node.yaml (DDP). launch/fsdp.yaml and
#                      launch/deepspeed_zero{2,3}.yaml work too: the node count, ranks and rendezvous
#                      address are overridden on the command line below whatever the file says.
#   GPUS_PER_NODE      processes per node. Default: SLURM_GPUS_ON_NODE (set with --gres gpu:N), else the
#                      GPUs torch sees; on a node without GPUs, 1 CPU process (set it for more, e.g. 2).
#   MIXED_PRECISION    passed to accelerate launch when set (no|bf16|fp16). Default: the config's value
#                      on GPU nodes, "no" on nodes without GPUs (bf16 autocast on CPU is slow).
#   MAIN_PROCESS_PORT  rendezvous port on the first node, default 29500.
#   FINETUNE_VENV      a virtualenv to activate first (optional).
#   FINETUNE_RESUME    auto (default) | always | never: when to add `--resume_from_checkpoint last`.
#                      auto = only on a requeued run (SLURM_RESTART_COUNT > 0) and, when --output_dir
#                      is given, only if it holds a checkpoint-* folder; `last` is an error when there
#                      is no checkpoint yet, so it cannot be passed on a first run.
#   FINETUNE_PREEMPTED_EXIT_CODE  the trainer's "stopped on SIGTERM, checkpoint saved" code, default 143.
#   FINETUNE_MAX_REQUEUES         stop requeueing after this many restarts, default 20.
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun lets the workers finish their checkpoint after it
#                      forwards SIGTERM before it SIGKILLs them, default here 150 (torch's own: 30).
#
# Preemption and time limits. SLURM sends this batch shell SIGUSR1 180 s before the time limit
# (--signal=B:USR1@180). The shell then sends SIGTERM to the training step with `scancel --signal`
# (not `kill` on srun: srun turns a SIGTERM it receives into SIGKILL for its tasks), every worker saves
# a checkpoint and exits, and the job requeues itself; the next run resumes from the newest checkpoint.
# Trigger the same by hand with `scancel --batch --signal=USR1 <jobid>`.
# A SIGTERM to this shell (scancel, or preemption) is passed on to the step the same way, so the
# trainer still checkpoints, but the script does not requeue: a scancel stays a cancel, and a
# partition with PreemptMode=REQUEUE requeues the job by itself (hence --requeue).
# A step that ends with FINETUNE_PREEMPTED_EXIT_CODE also means "checkpoint saved, run me again" and
# is requeued. NOTE: `accelerate launch` (torchrun) reports any failing worker as exit code 1, so a
# worker's 143 does not reach this script through it; the signal path above is the reliable one.
#
#SBATCH --job-name=finetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
# CPU cores for the 8 workers and their data loaders. Many clusters default to 1 core per task: set it.
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
# Log in the submit directory (%x = job name, %j = job id); a requeued run appends to the same file.
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

set -uo pipefail

log() { echo "[slurm.sh $(date '+%F %T')] $*"; }

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
if [[ -n "${FINETUNE_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "${FINETUNE_VENV}/bin/activate"
fi

LAUNCH_CONFIG="${LAUNCH_CONFIG:-launch/multi_node.yaml}"
# GPUs on this node: SLURM's count when --gres asked for them, else what torch sees (0 on a CPU-only node).
if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    NODE_GPUS="${SLURM_GPUS_ON_NODE}"
else
    NODE_GPUS="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$(( NODE_GPUS > 0 ? NODE_GPUS : 1 ))
fi
if [[ -z "${MIXED_PRECISION:-}" && "${NODE_GPUS}" -eq 0 ]]; then
    MIXED_PRECISION=no
fi
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
PREEMPTED_EXIT_CODE="${FINETUNE_PREEMPTED_EXIT_CODE:-143}"
MAX_REQUEUES="${FINETUNE_MAX_REQUEUES:-20}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}"

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "slurm.sh: not inside a SLURM job; submit it with: sbatch --nodes N launch/slurm.sh RECIPE [--flag value ...]" >&2
    exit 2
fi
if [[ ! -f "${LAUNCH_CONFIG}" ]]; then
    echo "slurm.sh: no accelerate config ${LAUNCH_CONFIG} in $(pwd); submit from the repository root" >&2
    exit 2
fi
if [[ $# -eq 0 ]]; then
    echo "slurm.sh: usage: sbatch --nodes N launch/slurm.sh RECIPE [--flag value ...]" >&2
    exit 2
fi

NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
MAIN_PROCESS_IP="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)"
if [[ -z "${MAIN_PROCESS_IP}" ]]; then
    echo "slurm.sh: could not read the first host of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'" >&2
    exit 2
fi

# The value of --output_dir in the finetune arguments, if given ("--output_dir X" or "--output_dir=X").
output_dir_arg() {
    local previous=""
    for arg in "$@"; do
        case "${previous}" in --output_dir) echo "${arg}"; return ;; esac
        case "${arg}" in --output_dir=*) echo "${arg#--output_dir=}"; return ;; esac
        previous="${arg}"
    done
}

wants_resume() {
    local arg out
    for arg in "$@"; do
        case "${arg}" in --resume_from_checkpoint|--resume_from_checkpoint=*) return 1 ;; esac  # the user chose
    done
    case "${FINETUNE_RESUME:-auto}" in
        always) return 0 ;;
        never) return 1 ;;
    esac
    [[ "${RESTARTS}" -gt 0 ]] || return 1
    out="$(output_dir_arg "$@")"
    [[ -z "${out}" ]] && return 0
    compgen -G "${out}/checkpoint-*" >/dev/null
}

train_args=("$@")
if wants_resume "$@"; then
    train_args+=(--resume_from_checkpoint last)
fi

PROCESSES=$((NNODES * GPUS_PER_NODE))
if [[ "${PROCESSES}" -eq 1 && "${LAUNCH_CONFIG}" == launch/multi_node.yaml ]]; then
    # accelerate refuses a MULTI_GPU config with one process; one process is the single-GPU case.
    LAUNCH_CONFIG=launch/single_gpu.yaml
fi
launch_args=(
    --config_file "${LAUNCH_CONFIG}"
    --num_machines "${NNODES}"
    --num_processes "${PROCESSES}"
    --main_process_ip "${MAIN_PROCESS_IP}"
    --main_process_port "${MAIN_PROCESS_PORT}"
)
if [[ -n "${MIXED_PRECISION:-}" ]]; then
    launch_args+=(--mixed_precision "${MIXED_PRECISION}")
fi
# --kill-on-bad-exit=0 (explicit, clusters may default to 1): after a SIGTERM every node exits non-zero
# once its part of the checkpoint is written; killing the others at the first such exit would cut
# their writes short (FSDP and DeepSpeed checkpoints are written by every rank).
srun_args=(--nodes="${NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=0)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    # srun does not inherit sbatch's --cpus-per-task on current SLURM releases.
    srun_args+=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
fi

log "job ${SLURM_JOB_ID}, restart ${RESTARTS}: ${NNODES} node(s) x ${GPUS_PER_NODE} process(es) (${NODE_GPUS} GPU(s) on this node), main ${MAIN_PROCESS_IP}:${MAIN_PROCESS_PORT}, config ${LAUNCH_CONFIG}"
log "finetune train ${train_args[*]}"

REQUEUE_ASKED=0
TERM_RECEIVED=0
INTERRUPTED=0
stop_step() {
    # Steps only, not this batch shell (scancel leaves the batch step alone unless --batch/--full).
    scancel --signal=TERM "${SLURM_JOB_ID}" || log "scancel --signal=TERM ${SLURM_JOB_ID} failed"
}
on_usr1() {
    log "SIGUSR1: time limit near; asking the workers to checkpoint and stop, then requeueing"
    REQUEUE_ASKED=1
    INTERRUPTED=1
    stop_step
}
job_state() {
    scontrol show job "${SLURM_JOB_ID}" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n1 | cut -d= -f2
}
on_term() {
    TERM_RECEIVED=1
    INTERRUPTED=1
    local state
    state="$(job_state)"
    if [[ -n "${state}" && "${state}" != RUNNING ]]; then
        # scancel, scontrol requeue or preemption: SLURM itself sends SIGTERM to every step of the job (and
        # refuses a further scancel, "Job can not be altered now"). The workers checkpoint and exit; SLURM
        # kills what is left after KillWait, so a checkpoint must take less than KillWait (scontrol show config).
        log "SIGTERM: SLURM is ending the job (state ${state}) and signals the training step itself; waiting for its checkpoint"
        return
    fi
    log "SIGTERM: job cancelled or preempted; asking the workers to checkpoint and stop"
    stop_step
}
trap on_usr1 USR1
trap on_term TERM

# One task per node; each expands its own SLURM_NODEID into --machine_rank. The command runs in the
# background so that this shell can handle signals while it waits (bash runs traps only between
# commands, and `wait` is interrupted by a trapped signal).
# shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, not here
srun "${srun_args[@]}" bash -c 'exec accelerate launch --machine_rank "${SLURM_NODEID}" "$@"' finetune-node \
    "${launch_args[@]}" -m finetune train "${train_args[@]}" &
SRUN_PID=$!

rc=0
while true; do
    INTERRUPTED=0
    wait "${SRUN_PID}"
    rc=$?
    # A trapped signal makes `wait` return 128+signal while the step may still be running: wait again
    # (for a step that has already ended, `wait` returns its stored exit status).
    if [[ "${INTERRUPTED}" -eq 1 && "${rc}" -gt 128 ]]; then
        continue
    fi
    break
done
log "training step exited with code ${rc}"

requeue() {
    if [[ "${RESTARTS}" -ge "${MAX_REQUEUES}" ]]; then
        log "not requeueing: already restarted ${RESTARTS} times (FINETUNE_MAX_REQUEUES=${MAX_REQUEUES})"
        exit "${PREEMPTED_EXIT_CODE}"
    fi
    log "requeueing job ${SLURM_JOB_ID}; the next run resumes from the newest checkpoint"
    if scontrol requeue "${SLURM_JOB_ID}"; then
        exit 0
    fi
    log "scontrol requeue failed; resubmit by hand with --resume_from_checkpoint last"
    exit "${PREEMPTED_EXIT_CODE}"
}

if [[ "${rc}" -eq 0 ]]; then
    log "training finished"
    exit 0
fi
if [[ "${REQUEUE_ASKED}" -eq 1 ]]; then
    requeue
fi
if [[ "${TERM_RECEIVED}" -eq 1 ]]; then
    log "stopped by SIGTERM; not requeueing from here (SLURM requeues preempted --requeue jobs itself)"
    exit "${rc}"
fi
if [[ "${rc}" -eq "${PREEMPTED_EXIT_CODE}" ]]; then
    log "exit code ${rc}: preempted, checkpoint saved"
    requeue
fi
exit "${rc}"

#!/usr/bin/env bash
# Shared launcher for the Slurm job scripts: one task per node, each running torchrun for all GPUs
# of its node, rendezvous over c10d on the first node of the allocation.
#
#   launch CONFIG [--dotted.override=value ...]
#
# Environment:
#   GPUS_PER_NODE     processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT       rendezvous port on the first node (default 29500)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks to checkpoint after a signal (default 240)
#   DRY_RUN=1         print the exact srun/torchrun command and exit
#   PYTHON            the interpreter of the environment (default: .venv/bin/python if present)
#
# Preemption and requeue. The job scripts ask Slurm for SIGUSR1 on the batch shell 300 s before
# the time limit (--signal=B:USR1@300). The trap below passes it to srun, which passes it to each
# node's torchrun, which passes it to every rank (--signals-to-handle); the ranks agree to stop
# at the next step boundary, write a checkpoint and exit 75. Rank 0 writes that code to
# LRC_EXIT_FILE (torchrun itself exits 1), and on 75 the script requeues the job (same job id):
# the requeued run resumes from checkpoint.dir/latest. SIGTERM to the batch shell
# (`scancel --batch --signal=TERM JOB`) checkpoints the same way and does not requeue; it is
# passed on as SIGUSR1 because srun answers SIGTERM by killing its tasks at once.

launch() {
    local config=$1
    shift
    : "${SLURM_JOB_NODELIST:?run under sbatch/salloc (SLURM_JOB_NODELIST is not set)}"
    local hosts head nnodes gpus port python
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    head=$(head -n 1 <<<"$hosts")
    nnodes=$(wc -l <<<"$hosts")
    gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    port=${MASTER_PORT:-29500}
    python=${PYTHON:-python}
    [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python

    # NCCL: fail fast on a dead peer instead of hanging; one OpenMP thread per rank.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export WANDB_MODE=${WANDB_MODE:-offline}

    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): pass it on.
    local signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    local cmd=(
        srun --ntasks-per-node=1 --nodes="$nnodes" --kill-on-bad-exit=1
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}
        "$python" -m torch.distributed.run
        --nnodes="$nnodes" --nproc_per_node="$gpus"
        --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="${SLURM_JOB_ID:-0}"
        --signals-to-handle="$signals" --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}"
        -m lrc_dist.train "$config" "$@"
    )
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        printf '\n'
        return 0
    fi
    echo "$(date '+%F %T') job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $nnodes node(s): ${cmd[*]}"
    local pid="" stop=0 status code
    mkdir -p logs  # on the shared filesystem of the submit dir: rank 0 may run on another node
    export LRC_EXIT_FILE="$PWD/logs/.exit-${SLURM_JOB_ID:-0}"
    rm -f "$LRC_EXIT_FILE"
    trap 'echo "$(date "+%F %T") SIGUSR1: checkpoint, then requeue"; kill -USR1 "$pid" 2>/dev/null || true' USR1
    trap 'echo "$(date "+%F %T") SIGTERM: checkpoint, then stop"; stop=1; kill -USR1 "$pid" 2>/dev/null || true' TERM
    "${cmd[@]}" &
    pid=$!
    # A trapped signal ends `wait` early; wait again until srun itself has exited.
    while true; do
        status=0
        wait "$pid" || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    code=$(cat "$LRC_EXIT_FILE" 2>/dev/null || echo "none")
    rm -f "$LRC_EXIT_FILE"
    if [ "$code" = 75 ] && [ "$stop" = 0 ]; then
        echo "$(date '+%F %T') preempted with a checkpoint: requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    echo "$(date '+%F %T') training exited ${code} (srun: ${status})"
    return "$status"
}

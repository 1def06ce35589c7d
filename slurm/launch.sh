#!/usr/bin/env bash
# Shared launcher for the lrc_*.sh Slurm jobs: one task per node, each running torchrun for
# all GPUs of its node, rendezvous over c10d on the first node of the allocation.
#
#   launch CONFIG [--dotted.override=value ...]
#
# Environment:
#   GPUS_PER_NODE  processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT    rendezvous port on the first node (default 29500)
#   DRY_RUN=1      print the exact srun/torchrun command and exit
#   PYTHON         the interpreter of the environment (default: .venv/bin/python if present)
# Preemption: the job scripts ask Slurm for SIGUSR1 five minutes before the time limit. The job
# then requeues itself, and the requeued run resumes from checkpoint.dir/latest.

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

    local cmd=(
        srun --ntasks-per-node=1 --nodes="$nnodes" --kill-on-bad-exit=1
        "$python" -m torch.distributed.run
        --nnodes="$nnodes" --nproc_per_node="$gpus"
        --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="${SLURM_JOB_ID:-0}"
        -m lrc_dist.train "$config" "$@"
    )
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        printf '\n'
        return 0
    fi
    trap 'echo "time limit near: requeueing ${SLURM_JOB_ID}"; scontrol requeue "${SLURM_JOB_ID}"' USR1
    "${cmd[@]}" &
    local pid=$!
    # wait returns early when USR1 arrives; wait again for srun's own exit status.
    wait "$pid" || wait "$pid"
}

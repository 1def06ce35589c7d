#!/usr/bin/env bash
# The tests' tiny job (configs/tiny_cpu.yaml) on one CPU node, 2 ranks: a quick check of a
# cluster's Slurm path (signal, checkpoint, requeue, resume) before booking GPUs.
#   sbatch slurm/tiny_cpu.sh --model.teacher=DIR --data.paths=[TOKENS] --parallel.backend=fsdp --steps=2000
# Submit from the repository root: logs go to logs/ there (shipped empty), appended across requeues.
#SBATCH --job-name=lrc-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail
# sbatch runs a copy of this script from its spool directory: find the repository by the submit dir.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export GPUS_PER_NODE=${GPUS_PER_NODE:-2} SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
launch configs/tiny_cpu.yaml "$@"

#!/usr/bin/env bash
# LRC-4B, Qwen2.5-7B-Instruct -> d_S 2048, on 4 nodes x 8 GPUs (FSDP2). Extra arguments are config overrides:
#   sbatch slurm/lrc_qwen7b.sh --parallel.backend=deepspeed --optim.lr=1e-4
# Submit from the repository root: logs go to logs/ there (shipped empty), appended across requeues.
#SBATCH --job-name=lrc-qwen7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail
# sbatch runs a copy of this script from its spool directory: find the repository by the submit dir.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
launch configs/lrc_qwen7b.yaml "$@"

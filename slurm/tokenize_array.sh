#!/usr/bin/env bash
# Tokenizes a corpus with a Slurm job array: array task I of N tokenizes split I of the input
# files (balanced by size) into OUTPUT; a dependent job then merges the split manifests.
#
#   mkdir -p logs
#   jid=$(sbatch --parsable --array=0-15 slurm/tokenize_array.sh 'data/fineweb/*.parquet' TEACHER_DIR tokens/fineweb)
#   sbatch --dependency=afterok:"$jid" slurm/tokenize_array.sh --merge tokens/fineweb
#
# Extra arguments go to data_prep/tokenize.py (e.g. --chat_field conversations --max_chars 200000).
# Rerunning a task (or the whole array) resumes: finished shards are skipped. The array must be
# 0..N-1 without gaps, as every task needs N. PYTHON overrides the interpreter (default .venv).
#SBATCH --job-name=lrc-tokenize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

# Under sbatch the script runs from a spool copy: the submit directory is the repository.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}

if [[ "${1:-}" == "--merge" ]]; then
    exec "$PYTHON" data_prep/tokenize.py merge "${2:?usage: slurm/tokenize_array.sh --merge OUTPUT}"
fi

if [[ $# -lt 3 ]]; then
    echo "usage: sbatch --array=0-N slurm/tokenize_array.sh INPUT TOKENIZER_DIR OUTPUT [tokenize.py options]" >&2
    exit 2
fi
input=$1 tokenizer=$2 output=$3
shift 3

: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-N}"
num_splits=${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=0-N}
if [[ "${SLURM_ARRAY_TASK_MIN:-0}" != 0 || "${SLURM_ARRAY_TASK_MAX:-$((num_splits - 1))}" != $((num_splits - 1)) ]]; then
    echo "the array must be 0..N-1 without gaps (got ${SLURM_ARRAY_TASK_MIN}..${SLURM_ARRAY_TASK_MAX}, $num_splits tasks)" >&2
    exit 2
fi

# One worker process per allocated CPU: each tokenizes whole files.
exec "$PYTHON" data_prep/tokenize.py --input "$input" --tokenizer "$tokenizer" --output "$output" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" --num_splits "$num_splits" --split_index "$SLURM_ARRAY_TASK_ID" \
    --progress False "$@"

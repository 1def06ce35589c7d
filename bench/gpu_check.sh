#!/usr/bin/env bash
# The GPU proof, one script, under ten minutes on one H100/H200:
#
#   bench/gpu_check.sh                      # CUDA: Llama-3.2-3B -> 1536 and Qwen2.5-7B -> 2048, full depth
#   bench/gpu_check.sh --device cpu --tiny  # the same steps on a tiny shape (what the test suite runs)
#
# For each shape, random weights, bf16, seq 2048, micro-batch 1, activation checkpointing, the
# teacher on the one GPU (bench/gpu_step.py):
#   - the LRC step through FSDP2: tokens/s, MFU, peak memory (max_memory_allocated) next to the
#     planner's prediction for the same config (python -m lrc_dist.plan);
#   - the same step through DeepSpeed ZeRO-3 (ds_configs/zero3.json);
#   - bench/step_bench.py: the LRC step against teacher forward + dense student step (the ratio),
#     and (CUDA only) the same for the first shape with parallel.compile on both sides.
# Figures go to $OUT (default runs/gpu_check): one JSON per step, step_bench's text, and
# summary.md, printed at the end. Record them in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda tiny=0
while [ $# -gt 0 ]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
        *) echo "usage: bench/gpu_check.sh [--device cuda|cpu] [--tiny]" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$device" = cpu ]; then
    export DS_ACCELERATOR=cpu
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/lrc_dist/torch_extensions}
fi
if [ "$tiny" = 1 ]; then
    shapes=(tiny) seq=64 steps=2 bench_shape=cpu bench_dtype=float32  # bf16 matmuls are slow on a CPU
else
    shapes=(llama3b qwen7b) seq=2048 steps=4 bench_dtype=bfloat16
fi
started=$(date +%s)
for shape in "${shapes[@]}"; do
    for backend in fsdp deepspeed; do
        echo "== $shape, $backend"
        # torchrun with one process: DeepSpeed needs the launcher's environment
        "$python" -m torch.distributed.run --standalone --nproc_per_node=1 bench/gpu_step.py --shape "$shape" \
            --backend "$backend" --device "$device" --seq "$seq" --steps "$steps" --out "$out/step_${shape}_${backend}.json"
    done
    echo "== $shape, LRC step vs teacher forward + dense student step"
    "$python" bench/step_bench.py --shape "${bench_shape:-$shape}" --device "$device" --dtype "$bench_dtype" \
        --seq "$seq" --batch 1 --steps 3 | tee "$out/dense_${shape}.txt"
done
if [ "$tiny" = 0 ]; then
    echo "== ${shapes[0]}, the same compiled (parallel.compile: blocks, layers, head kernels)"
    "$python" bench/step_bench.py --shape "${shapes[0]}" --device "$device" --dtype "$bench_dtype" \
        --seq "$seq" --batch 1 --steps 3 --compile --split | tee "$out/dense_${shapes[0]}_compiled.txt"
fi
"$python" - "$out" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), sys.argv[2]
rows = ["| shape | backend | device | layers | tokens/s | MFU | peak GiB | planned GiB | planned tokens/s |",
        "|---|---|---|---|---|---|---|---|---|"]
fmt = lambda v, f: "-" if v is None else format(v, f)
for path in sorted(out.glob("step_*.json")):
    r = json.loads(path.read_text())
    rows.append(f"| {r['shape']} | {r['backend']} | {r['device']} | {r['layers']} | {r['tokens_per_s']:,.0f} | "
                f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_gb'], '.1f')} | {fmt(r['predicted_peak_gb'], '.1f')} | "
                f"{fmt(r['predicted_tokens_per_s'], ',.0f')} |")
for path in sorted(out.glob("dense_*.txt")):
    ratio = next((l for l in path.read_text().splitlines() if l.startswith("ratio")), "ratio: none")
    rows.append(f"\n{path.stem}: {ratio}")
text = "\n".join(rows) + f"\n\n({seconds} s)\n"
(out / "summary.md").write_text(text)
print(text)
PY

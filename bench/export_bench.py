"""The trainer's export: from the model the run holds (now) vs building the model again from disk (before).

    .venv/bin/python bench/export_bench.py                     # Llama d=1024, 8 layers, vocab 32k; bf16 run
    .venv/bin/python bench/export_bench.py --dtype float32 --repeats 3

A random Llama teacher (untied, ~155M parameters: 620 MB in fp32) is saved in the run's dtype, as
real checkpoints are. Each variant runs in a fresh process that first builds the LRC model as the
trainer does (`build_model`: the teacher in the run's dtype, fp32 projections), as one process
(`parallel.backend=none`), and then exports it once, as `train.export_to` does:

- from disk: the export that builds the model again: the trainable state gathered (what
  `full_trainable_state` did), the model built again in fp32 from disk, the student materialised
  at once (tests/export_reference.py);
- live: `export.export_run` on the model held, one part at a time.

Around the export alone it measures the wall time, the CPU time (all threads) and the peak RSS
(the kernel's VmHWM, reset through /proc/self/clear_refs just before); it prints the best of the
interleaved repeats and the ratios live / from disk. The two exports
are compared file by file: they must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]

# hidden, intermediate, layers, heads, kv heads, head_dim, vocab, student width
SHAPE = (1024, 2816, 8, 16, 4, 64, 32000, 512)


def write_teacher(path: Path, dtype: torch.dtype) -> int:
    """A random Llama checkpoint in `path`; returns its parameter count."""
    from lrc_dist.model import CausalLM, ModelArgs

    d, inter, layers, heads, kv, hd, vocab, _ = SHAPE
    config = AutoConfig.for_model("llama", hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, vocab_size=vocab,
                                  tie_word_embeddings=False)
    model = CausalLM(ModelArgs.from_hf(config), config)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02 if v.dim() > 1 else 1 + 0.1 * torch.randn(v.shape, generator=g))
             .to(dtype) for k, v in model.state_dict().items()}
    config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"))
    return sum(v.numel() for v in state.values())


def memory_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def child(variant: str, teacher: str, out: str, dtype: str) -> None:
    """One export in this fresh process; prints {"wall_s", "cpu_s", "peak_mb", "before_mb"} as JSON."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from export_reference import export_from_disk
    from lrc_dist.build import build_model
    from lrc_dist.config import load_config
    from lrc_dist.export import export_run
    from lrc_dist.parallel import TorchBackend, init_distributed

    cfg = load_config(None, {"model.teacher": teacher, "model.dtype": dtype, "parallel.backend": "none",
                             "model.lrc.student_hidden_size": SHAPE[-1], "checkpoint.dir": str(Path(out).parent)})
    info = init_distributed("cpu")
    model = build_model(cfg)
    backend = TorchBackend(model, cfg, info)
    summary = {"method": "lrc", "step": 1, "steps": 1, "metrics": {}, "tokens": 0}
    with torch.no_grad():  # resident, as after training steps (weights loaded from safetensors are mmapped)
        for p in model.parameters():
            p.sum()
    before = memory_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start, cpu = time.perf_counter(), time.process_time()
    if variant == "from_disk":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        export_from_disk(cfg, get_state_dict(model, [], options=options)[0], Path(out), summary)
    else:
        export_run(model, backend, cfg, Path(out), summary)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_mb": memory_kb("VmHWM") / 1024, "before_mb": before / 1024}))


def same_files(a: Path, b: Path) -> bool:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    return names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main(dtype: str = "bfloat16", repeats: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        params = write_teacher(teacher, getattr(torch, dtype))
        print(f"teacher: {params / 1e6:.1f}M parameters, {dtype} on disk ({(teacher / 'model.safetensors').stat().st_size / 2**20:.0f} MiB); "
              f"student width {SHAPE[-1]}; torch threads {torch.get_num_threads()}")
        results: dict[str, list[dict]] = {"from_disk": [], "live": []}
        for r in range(repeats):  # interleaved
            for variant in results:
                out = Path(tmp) / f"{variant}_{r}" / "export"
                # tests/: the export from disk is kept there, as the tests' reference
                env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(k, None)
                proc = subprocess.run([sys.executable, __file__, "child", variant, str(teacher), str(out), dtype],
                                      env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        identical = all(same_files(Path(tmp) / f"from_disk_{r}" / "export", Path(tmp) / f"live_{r}" / "export")
                        for r in range(repeats))
    best = {v: {k: min(x[k] for x in runs) for k in runs[0]} for v, runs in results.items()}
    print("| export | wall time (runs) | CPU time | peak RSS during the export | RSS before (the model held) | "
          "peak above it |")
    print("|---|---|---|---|---|---|")
    for v, b in best.items():
        runs = ", ".join(f"{x['wall_s']:.2f}" for x in results[v])
        print(f"| {v} | {b['wall_s']:.2f} s ({runs}) | {b['cpu_s']:.2f} s | {b['peak_mb']:,.0f} MB | "
              f"{b['before_mb']:,.0f} MB | {b['peak_mb'] - b['before_mb']:,.0f} MB |")
    old, new = best["from_disk"], best["live"]
    print(f"ratios live / from disk: wall time {new['wall_s'] / old['wall_s']:.3f}, CPU time "
          f"{new['cpu_s'] / old['cpu_s']:.3f}, peak RSS "
          f"{new['peak_mb'] / old['peak_mb']:.3f}, peak above the held model "
          f"{(new['peak_mb'] - new['before_mb']) / (old['peak_mb'] - old['before_mb']):.3f}")
    print(f"exports identical file for file: {identical}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(*sys.argv[2:6])
    else:
        fire.Fire(main)

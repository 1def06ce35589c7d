"""The trainer's own LRC step at a real shape on one device, measured next to the planner's prediction.

    .venv/bin/python bench/gpu_step.py --shape qwen7b --backend fsdp --out runs/gpu_check/qwen7b_fsdp.json
    .venv/bin/python bench/gpu_step.py --shape tiny --device cpu --backend deepspeed

Random weights (teacher N(0, 0.02), projections as `lrc.init=random`), bf16 teacher and compute,
fp32 masters, one process. First `python -m lrc_dist.plan` predicts this very config on one GPU
(`--json`, the same layout only); then the step runs `steps` times through `train.take_step` with
the configured backend (`parallel.TorchBackend` with FSDP2, or `DeepSpeedBackend`, ZeRO-3 from
ds_configs/zero3.json). Reported: tokens/s and MFU from the median step after the first, the peak
memory the device's allocator saw (CUDA: `max_memory_allocated`; not measured on a CPU) and the
planner's predicted peak. bench/gpu_check.sh runs it for each shape and backend.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch
import yaml
from transformers import AutoConfig

from lrc_dist.config import parse_args
from lrc_dist.metrics import peak_flops
from lrc_dist.plan import GiB, TEACHERS, _model, at_depth, teacher_config

SHAPES = {"llama3b": ("Llama-3.2-3B-Instruct", 1536), "qwen7b": ("Qwen2.5-7B-Instruct", 2048), "tiny": (None, 64)}


def write_config(shape: str, path: Path, seq: int, micro: int, backend: str, checkpointing: bool,
                 layers: int | None) -> Path:
    """The config the step runs (and the planner plans): a recipe-like YAML over a teacher shape."""
    name, d_s = SHAPES[shape]
    teacher = path / "teacher"
    if name is None:  # tiny: a 2-layer Qwen2 shape of our own
        AutoConfig.for_model("qwen2", hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                             tie_word_embeddings=False).save_pretrained(teacher)
    else:
        config = at_depth(AutoConfig.from_pretrained(TEACHERS / name), layers)
        config.save_pretrained(teacher)
    recipe = {"model": {"teacher": str(teacher), "dtype": "bfloat16", "lrc": {"student_hidden_size": d_s}},
              "data": {"seq_len": seq}, "micro_batch_size": micro, "global_batch_size": micro,
              "parallel": {"backend": backend, "teacher": "replicate", "activation_checkpointing": checkpointing}}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return path / "recipe.yaml"


def predicted(recipe: Path, memory_gb: float, checkpointing: bool, micro: int) -> dict | None:
    """The planner's candidate for this layout on one GPU (it runs in a process of its own)."""
    cmd = [sys.executable, "-m", "lrc_dist.plan", str(recipe), "--nodes", "1", "--gpus-per-node", "1",
           "--gpu-memory-gb", str(memory_gb), "--json", "--teacher", "replicate", "--activation-checkpointing",
           "on" if checkpointing else "off", "--micro-batch-sizes", str(micro)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout)["candidates"][0]


def main(shape: str = "qwen7b", backend: str = "fsdp", device: str = "cuda", seq: int = 2048, micro: int = 1,
         steps: int = 4, checkpointing: bool = True, layers: int | None = None, out: str | None = None) -> dict:
    from lrc_dist.parallel import build_backend, init_distributed
    from lrc_dist.train import take_step

    with tempfile.TemporaryDirectory() as tmp:
        recipe = write_config(shape, Path(tmp), seq, micro, backend, checkpointing, layers)
        memory = torch.cuda.get_device_properties(0).total_memory / GiB if device == "cuda" else 80.0
        plan = predicted(recipe, memory, checkpointing, micro) if backend == "fsdp" else None
        cfg = parse_args([str(recipe)])
        hf_config, _ = teacher_config(cfg)
        info = init_distributed(device)
        dev = info.device
        with torch.no_grad():
            model = _model(cfg, hf_config, dev)
            for p in model.parameters():
                if not p.requires_grad:
                    p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        backend_ = build_backend(model, cfg, info, grad_accum=1)
        state, times = {"recent_losses": []}, []
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, model.vocab_size, (micro, seq + 1), generator=g)
            micro_batch = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            bad, _, metrics = take_step(backend_, model, micro_batch, cfg, info, state)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            assert bad is None, bad
        step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
        tokens = micro * seq
        peak = peak_flops(dev, None)
        result = {"shape": shape, "backend": backend, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                  else "cpu", "layers": hf_config.num_hidden_layers, "seq": seq, "micro_batch_size": micro,
                  "activation_checkpointing": checkpointing, "step_s": step_s, "tokens_per_s": tokens / step_s,
                  "mfu": tokens / step_s * model.flops_per_token(seq, tokens) / peak if peak else None,
                  "peak_gb": torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None,
                  "predicted_peak_gb": plan["peak_gb"]["total"] if plan else None,
                  "predicted_tokens_per_s": plan["tokens_per_s_per_gpu"] if plan else None,
                  "loss": float(metrics["loss"])}
    print(json.dumps(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)

"""LRC training step vs (teacher forward + an equally shaped dense student's training step).

    .venv/bin/python bench/step_bench.py                       # CPU-sized model, paper's seq 2048 x 2
    .venv/bin/python bench/step_bench.py --shape qwen7b --device cuda --dtype bfloat16 --seq 2048
    .venv/bin/python bench/step_bench.py --allocator product   # as the trainer runs: no environment variable

Both sides train the same student shape on the same tokens with the same LM + KL head loss and
AdamW; the LRC side additionally generates its weights (W_T @ P), computes the clone terms and
backpropagates into the projections. Timings are interleaved (LRC, dense, LRC, ...) in one run
and the medians compared: ratio = LRC / dense (target <= 1.10). Random weights, no checkpoint.
On CPU, torch runs on one thread and steps are timed by that thread's CPU time, so that other
work on a shared machine does not skew the ratio; the wall-time ratio is printed beside it.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import fire
import torch
from transformers import AutoConfig

from lrc_dist.losses import LossConfig, head_losses
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.metrics import lrc_flops_per_token, peak_flops
from lrc_dist.families import ModelArgs
from lrc_dist.model import CausalLM
from lrc_dist.resources import keep_freed_cpu_memory

# (model_type, hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied, student hidden)
SHAPES = {
    "cpu": ("qwen2", 512, 1408, 4, 8, 2, 64, 8192, False, 256),
    "llama3b": ("llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 1536),
    "qwen7b": ("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, 2048),
}


def random_model(shape: str, hidden: int | None = None, dtype=torch.float32, device="cpu") -> CausalLM:
    kind, d, inter, layers, heads, kv, hd, vocab, tied, _ = SHAPES[shape]
    cfg = AutoConfig.for_model(kind, hidden_size=hidden or d, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, vocab_size=vocab,
                               tie_word_embeddings=tied)
    with torch.device(device):
        model = CausalLM(ModelArgs.from_hf(cfg), cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def timed(fn, device) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this thread, page faults of this thread). On a shared CPU
    machine the thread's CPU time (with torch on one thread) is the robust measure: other tenants
    inflate wall time, not it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return wall, cpu, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults


# By default glibc serves blocks of 32 MiB and more (here the 128 MiB logit chunks of the head
# loss) with mmap, unmaps them on free and page-faults them back in, zero-filled, on the next
# step: ~0.1 s per step on this machine, and how many of them a step maps depends on which free
# heap blocks happen to fit. The CUDA caching allocator keeps freed blocks; so does glibc with
# these settings (every block from the heap, the heap never trimmed). The bench prints the page
# faults per step: with them, a few thousand at most (the heap growing), against ~459k without.
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
                     "MALLOC_TOP_PAD_": str(1 << 30)}


def main(shape: str = "cpu", batch: int = 2, seq: int = 2048, steps: int = 3, device: str = "cpu",
         dtype: str = "float32", checkpointing: bool = False, threads: int = 1, allocator: str = "bench",
         chunk_tokens: int | None = None):
    """allocator (CPU): bench, glibc told by CPU_ALLOCATOR_ENV to keep freed memory (the bench
    re-executes itself with it); product, what the trainer does with no environment variable
    (lrc_dist.resources.keep_freed_cpu_memory); glibc, its defaults. chunk_tokens: the head
    loss's (loss.chunk_tokens; default: by device type)."""
    if allocator not in ("bench", "product", "glibc"):
        raise ValueError(f"--allocator {allocator!r}: bench, product or glibc")
    if device == "cpu" and allocator == "bench" and any(os.environ.get(k) != v for k, v in CPU_ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_ALLOCATOR_ENV})
    if device == "cpu" and allocator == "product":
        keep_freed_cpu_memory()
    torch.set_num_threads(threads)
    dev, dt = torch.device(device), getattr(torch, dtype)
    torch.manual_seed(0)
    d_s = SHAPES[shape][-1]
    loss_cfg = LossConfig(chunk_tokens=chunk_tokens)
    ids = torch.randint(0, SHAPES[shape][7], (batch, seq + 1), device=dev)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    teacher = random_model(shape, dtype=dt, device=dev).requires_grad_(False)
    lrc = LowRankClone(random_model(shape, dtype=dt, device=dev), LRCConfig(d_s))
    lrc.init_weights()
    lrc.to(dev)
    for block in lrc.layers:
        block.activation_checkpointing = checkpointing
    lrc_opt = torch.optim.AdamW([p for p in lrc.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    student = random_model(shape, hidden=d_s, dtype=torch.float32, device=dev)  # fp32 masters, like LRC's
    dense_opt = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)

    def lrc_step():
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            loss, _ = lrc(inputs, labels, loss_cfg)
        loss.backward()
        lrc_opt.step()
        lrc_opt.zero_grad(set_to_none=True)

    def dense_step():
        with torch.no_grad():
            h_t = teacher.hidden_states(inputs)
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            h_s = student.hidden_states(inputs)
            loss, _, _ = head_losses(h_s.flatten(0, 1), student.lm_head_weight, h_t.flatten(0, 1),
                                     teacher.lm_head_weight, labels.flatten(), loss_cfg)
        loss.backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        lrc_step()
        dense_step()
    lrc_times, dense_times = [], []
    for _ in range(steps):
        lrc_times.append(timed(lrc_step, dev))
        dense_times.append(timed(dense_step, dev))
    # CPU: this thread's CPU time (exact only with threads=1); GPU: wall time, synchronised.
    clock = 1 if dev.type == "cpu" and threads == 1 else 0
    t_lrc = statistics.median(t[clock] for t in lrc_times)
    t_dense = statistics.median(t[clock] for t in dense_times)
    wall = statistics.median(t[0] for t in lrc_times) / statistics.median(t[0] for t in dense_times)
    faults = max(t[2] for t in lrc_times), max(t[2] for t in dense_times)
    tokens = batch * seq
    print(f"shape={shape} d_S={d_s} batch={batch} seq={seq} device={device} dtype={dtype} "
          f"threads={torch.get_num_threads()} checkpointing={checkpointing} allocator={allocator} "
          f"chunk_tokens={chunk_tokens or 'default'}")
    print(f"LRC step   {t_lrc * 1e3:9.1f} ms  {tokens / t_lrc:10.0f} tokens/s")
    print(f"dense step {t_dense * 1e3:9.1f} ms  {tokens / t_dense:10.0f} tokens/s  (teacher fwd + student train)")
    print(f"ratio LRC/dense = {t_lrc / t_dense:.3f}  (target <= 1.10; {'thread CPU' if clock else 'wall'} time; "
          f"wall-time ratio {wall:.3f})")
    if dev.type == "cpu":
        print(f"page faults per step, at most: LRC {faults[0]}, dense {faults[1]}")
        print(f"peak resident memory of the process (both sides): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    peak = peak_flops(dev, None)
    if peak:
        flops = lrc_flops_per_token(lrc.teacher_args, d_s, seq, tokens)
        print(f"MFU (LRC) = {tokens / t_lrc * flops / peak:.3f}")
    return t_lrc / t_dense


if __name__ == "__main__":
    fire.Fire(main)

"""LRC training step under FSDP2: every rank generating all student weights vs sharded generation.

    .venv/bin/python bench/generation_bench.py                               # 2 CPU ranks (gloo)
    .venv/bin/python bench/generation_bench.py --nproc 8 --device cuda --shape qwen7b --dtype bfloat16

With `parallel.shard_generation=true`, each rank multiplies 1/world of every W_T @ P and the ranks
all-gather the generated weights (lrc_dist.parallel.sharded_matmul). The bench builds one LRC model
of a `step_bench.py` shape, shards it as the trainer does (FSDP2, one unit per block, teacher
replicated, activation checkpointing as the trainer's default: the recompute gathers again), and
times interleaved steps with sharded generation on and off. Each rank times its
own steps; the slowest rank's median counts. It prints the ratio sharded/full (lower is better)
and the FLOP ratio the formula predicts (lrc_dist.metrics.lrc_flops_per_token). Steps are timed
by wall clock, which includes the all-gathers; on CPU each rank runs torch on one thread (run it on
a quiet machine with a core per rank), and the ratio of the ranks' own CPU time, which leaves the
collectives out, is printed beside it.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from pathlib import Path

import fire
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_bench import CPU_ALLOCATOR_ENV, SHAPES, random_model  # noqa: E402

from lrc_dist.config import load_config  # noqa: E402
from lrc_dist.losses import LossConfig  # noqa: E402
from lrc_dist.lrc import LowRankClone, LRCConfig  # noqa: E402
from lrc_dist.metrics import lrc_flops_per_token  # noqa: E402
from lrc_dist.parallel import DistInfo, shard_fsdp, sharded_matmul  # noqa: E402


def worker(shape: str, batch: int, seq: int, steps: int, device: str, dtype: str, checkpointing: bool) -> None:
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    dev = torch.device(device, int(os.environ["LOCAL_RANK"])) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    d_s = SHAPES[shape][-1]
    model = LowRankClone(random_model(shape, dtype=dt, device=dev), LRCConfig(d_s))
    model.init_weights()
    model.to(dev)
    model.set_activation_checkpointing(checkpointing)
    cfg = load_config(None, {"parallel.teacher": "replicate", "parallel.param_dtype": dtype,
                             "parallel.reduce_dtype": "float32"})
    shard_fsdp(model, cfg, DistInfo(rank, world, rank, dev))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, SHAPES[shape][7], (batch, seq + 1), device=dev,
                        generator=torch.Generator(dev).manual_seed(rank))
    loss_cfg = LossConfig()

    sharded = functools.partial(sharded_matmul, group=dist.new_group())

    def step(matmul):
        model.set_generation_matmul(matmul)
        loss, _ = model(ids[:, :-1], ids[:, 1:], loss_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(matmul) -> tuple[float, float]:
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.thread_time()
        step(matmul)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.thread_time() - cpu

    for _ in range(2):
        step(torch.matmul)
        step(sharded)
    times = {torch.matmul: [], sharded: []}
    for _ in range(steps):
        for matmul, runs in times.items():
            runs.append(timed(matmul))
    medians = torch.tensor([statistics.median(t[i] for t in runs) for runs in times.values() for i in (0, 1)],
                           dtype=torch.float64, device=dev)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank's
    wall_full, cpu_full, wall_sharded, cpu_sharded = medians.tolist()
    if rank == 0:
        tokens = batch * seq
        args = model.teacher_args
        flops = [lrc_flops_per_token(args, d_s, seq, tokens, ranks) for ranks in (1, world)]
        print(f"shape={shape} d_S={d_s} ranks={world} batch={batch} seq={seq} device={device} dtype={dtype} "
              f"checkpointing={checkpointing}")
        print(f"full generation     {wall_full * 1e3:9.1f} ms  {tokens / wall_full:9.0f} tokens/s per rank")
        print(f"sharded generation  {wall_sharded * 1e3:9.1f} ms  {tokens / wall_sharded:9.0f} tokens/s per rank")
        cpu = f"; CPU-time ratio {cpu_sharded / cpu_full:.3f}" if dev.type == "cpu" else ""
        print(f"ratio sharded/full = {wall_sharded / wall_full:.3f} (wall time{cpu}); FLOP ratio {flops[1] / flops[0]:.3f}")
    dist.destroy_process_group()


def main(shape: str = "cpu", batch: int = 4, seq: int = 256, steps: int = 5, nproc: int = 2, device: str = "cpu",
         dtype: str = "float32", checkpointing: bool = True):
    if "RANK" in os.environ:
        return worker(shape, batch, seq, steps, device, dtype, checkpointing)
    env = {**os.environ, **(CPU_ALLOCATOR_ENV if device == "cpu" else {}), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           f"--shape={shape}", f"--batch={batch}", f"--seq={seq}", f"--steps={steps}", f"--device={device}",
           f"--dtype={dtype}", f"--checkpointing={checkpointing}"]
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    fire.Fire(main)

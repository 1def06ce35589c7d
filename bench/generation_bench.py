"""LRC training step under FSDP2: every rank generating all student weights vs sharded generation.

    .venv/bin/python bench/generation_bench.py                               # 2 CPU ranks (gloo)
    .venv/bin/python bench/generation_bench.py --nproc 8 --device cuda --shape qwen7b --dtype bfloat16

With `parallel.shard_generation` (the default), each rank multiplies 1/world of every W_T @ P and
the ranks all-gather the generated weights (lrc_dist.lrc.generate). The bench builds one LRC model
of a `step_bench.py` shape, shards it as the trainer does (FSDP2, one unit per block, teacher
replicated), and times interleaved steps with sharded generation on and off. Each rank times its
own steps; the slowest rank's median counts. It prints the ratio sharded/full (lower is better)
and the FLOP ratio the formula predicts (lrc_dist.metrics.lrc_flops_per_token). Steps are timed
by wall clock, which includes the all-gathers; on CPU each rank runs torch on one thread (run it on
a quiet machine with a core per rank), and the ratio of the ranks' own CPU time, which leaves the
collectives out, is printed beside it.
"""

from __future__ import annotations

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
from lrc_dist.parallel import DistInfo, shard_fsdp  # noqa: E402


def worker(shape: str, batch: int, seq: int, steps: int, device: str, dtype: str) -> None:
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
    cfg = load_config(None, {"parallel.teacher": "replicate", "parallel.param_dtype": dtype,
                             "parallel.reduce_dtype": "float32"})
    shard_fsdp(model, cfg, DistInfo(rank, world, rank, dev))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, SHAPES[shape][7], (batch, seq + 1), device=dev,
                        generator=torch.Generator(dev).manual_seed(rank))
    loss_cfg = LossConfig()

    def step(group):
        model.shard_generation(group)
        loss, _ = model(ids[:, :-1], ids[:, 1:], loss_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(group) -> tuple[float, float]:
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.thread_time()
        step(group)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.thread_time() - cpu

    for _ in range(2):
        step(None)
        step(dist.group.WORLD)
    full, sharded = [], []
    for _ in range(steps):
        full.append(timed(None))
        sharded.append(timed(dist.group.WORLD))
    medians = torch.tensor([statistics.median(t[i] for t in runs) for runs in (full, sharded) for i in (0, 1)],
                           dtype=torch.float64, device=dev)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank's
    wall_full, cpu_full, wall_sharded, cpu_sharded = medians.tolist()
    t_full, t_sharded = wall_full, wall_sharded
    if rank == 0:
        tokens = batch * seq
        args = model.teacher_args
        flops = [lrc_flops_per_token(args, d_s, seq, tokens, ranks) for ranks in (1, world)]
        print(f"shape={shape} d_S={d_s} ranks={world} batch={batch} seq={seq} device={device} dtype={dtype}")
        print(f"full generation     {t_full * 1e3:9.1f} ms  {tokens / t_full:9.0f} tokens/s per rank")
        print(f"sharded generation  {t_sharded * 1e3:9.1f} ms  {tokens / t_sharded:9.0f} tokens/s per rank")
        cpu = f"; CPU-time ratio {cpu_sharded / cpu_full:.3f}" if dev.type == "cpu" else ""
        print(f"ratio sharded/full = {t_sharded / t_full:.3f} (wall time{cpu}); FLOP ratio {flops[1] / flops[0]:.3f}")
    dist.destroy_process_group()


def main(shape: str = "cpu", batch: int = 4, seq: int = 256, steps: int = 5, nproc: int = 2, device: str = "cpu",
         dtype: str = "float32"):
    if "RANK" in os.environ:
        return worker(shape, batch, seq, steps, device, dtype)
    env = {**os.environ, **(CPU_ALLOCATOR_ENV if device == "cpu" else {}), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           f"--shape={shape}", f"--batch={batch}", f"--seq={seq}", f"--steps={steps}", f"--device={device}",
           f"--dtype={dtype}"]
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    fire.Fire(main)

"""Sharded weight generation (`parallel.sharded_matmul`) on 2 gloo ranks: each rank generates
half of every student weight, and the gradients summed over ranks equal those of one process that
generates everything from the whole batch. This file is its own torchrun worker."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from conftest import build_checkpoint
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.metrics import lrc_flops_per_token
from lrc_dist.parallel import sharded_matmul

REPO = Path(__file__).resolve().parents[1]


def test_sharded_generation_on_two_ranks(tmp_path):
    teacher = build_checkpoint(tmp_path / "qwen2", "qwen2")  # untied head: it is generated too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, teacher]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("sharded generation ok") == 2


def check_generate(rank: int) -> None:
    """7 rows on 2 ranks (4 + 3, one padded): the product, and P's gradient summed over ranks."""
    g = torch.Generator().manual_seed(0)
    x, p = torch.randn(7, 5, generator=g), torch.randn(5, 3, generator=g).requires_grad_()
    upstream = torch.randn(2, 7, 3, generator=g)  # each rank's gradient of the product
    out = sharded_matmul(x, p, dist.group.WORLD)
    torch.testing.assert_close(out, x @ p)
    (out * upstream[rank]).sum().backward()
    grad = p.grad.clone()
    dist.all_reduce(grad)
    torch.testing.assert_close(grad, x.T @ upstream.sum(0))


def check_model(rank: int, teacher: str) -> None:
    model = LowRankClone.from_teacher(teacher, LRCConfig(32))  # same seed: the same model on both ranks
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg, normalizer = LossConfig(), float(ids.numel())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    want_loss, _ = model(ids, ids, cfg, normalizer)  # one process, the whole batch
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)

    model.set_generation_matmul(functools.partial(sharded_matmul, group=dist.group.WORLD), ranks=2)
    mine = ids[2 * rank : 2 * rank + 2]
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(mine, mine, cfg, normalizer)
        loss.backward()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss, want_loss.detach())
    for name, p in params.items():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-7, msg=name)

    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmul = sum(n for op, n in counts.items() if op in ("aten.mm", "aten.addmm", "aten.bmm"))
    tokens = mine.numel()
    project = model.projects_head(tokens)  # lrc.head_logits=auto: decided at the ranks' shared generation
    assert matmul == lrc_flops_per_token(model.teacher_args, 32, 0, tokens, generation_ranks=2,
                                         project_head=project) * tokens
    assert matmul < lrc_flops_per_token(model.teacher_args, 32, 0, tokens, project_head=project) * tokens


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        check_generate(dist.get_rank())
        check_model(dist.get_rank(), sys.argv[1])
        print("sharded generation ok", flush=True)
    finally:
        dist.destroy_process_group()

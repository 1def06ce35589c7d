"""The MFU numerator: our FLOP formula against PyTorch's FLOP counter on a real LRC step."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import build_checkpoint
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.metrics import lrc_flops_per_token


def matmul_flops(model: LowRankClone, batch: int, seq: int) -> int:
    """The matmul FLOPs PyTorch's counter sees in one training step (forward + backward)."""
    ids = torch.randint(0, 256, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(ids, ids, LossConfig())
        loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return sum(n for op, n in counts.items() if op in ("aten.mm", "aten.addmm", "aten.bmm"))


@pytest.mark.parametrize("head", ["generate", "project"])  # lrc.head_logits
@pytest.mark.parametrize("family", ["qwen2", "llama3"])  # untied and tied heads
def test_flops_per_token_matches_flop_counter(tmp_path, family, head):
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "m", family), LRCConfig(40, head_logits=head))
    batch, seq = 2, 64
    # The counter has no formula for CPU attention kernels: compare the matmul part exactly
    # (seq_len=0 drops the formula's attention term).
    formula = lrc_flops_per_token(model.teacher_args, 40, 0, batch * seq, project_head=head == "project")
    assert matmul_flops(model, batch, seq) == formula * batch * seq == model.flops_per_token(0, batch * seq) * batch * seq
    attention = lrc_flops_per_token(model.teacher_args, 40, seq, batch * seq) - lrc_flops_per_token(
        model.teacher_args, 40, 0, batch * seq)
    args = model.teacher_args
    assert attention == 16 * seq * args.num_heads * args.head_dim * args.num_layers  # 4x fwd: teacher 1, student 3


@pytest.mark.parametrize("projections", ["train", "freeze"])
def test_dense_phase_flops_match_the_flop_counter(tmp_path, projections):
    """The dense phase's MFU numerator: no weight generation, the target projections' work."""
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "m", "qwen2"), LRCConfig(40, dense_projections=projections))
    model.densify()
    batch, seq = 2, 64
    assert matmul_flops(model, batch, seq) == model.flops_per_token(0, batch * seq) * batch * seq
    assert model.flops_per_token(0, batch * seq) < lrc_flops_per_token(model.teacher_args, 40, 0, batch * seq)

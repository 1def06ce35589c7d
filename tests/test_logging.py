"""Logs a person reads: each record holds the interval's means (also across a resume), progress,
ETA and throughput; a start-up summary; no KL where there is none; and a DSKD projector that
keeps pace with the student head it decodes through."""

import json

import pytest
import torch

from conftest import assert_same_curve
from lrc_dist.metrics import PEAK_BF16_FLOPS, console_line, peak_flops
from lrc_dist.train import train
from test_train import tiny_cfg

TERMS = ("loss", "lm", "kl", "clone", "clone/q", "grad_norm")


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_a_record_holds_the_means_of_its_interval_also_across_a_resume(one_process, tiny_job, tmp_path, capsys,
                                                                        monkeypatch):
    import os
    import signal

    from lrc_dist.lrc import LowRankClone
    from lrc_dist.train import Preempted

    train(tiny_cfg(tiny_job, tmp_path / "every"))
    every = records(tmp_path / "every")
    interval = {"log.interval": 3, "checkpoint.interval": 1000}
    train(tiny_cfg(tiny_job, tmp_path / "threes", **interval))
    threes = records(tmp_path / "threes")
    means = [{"step": step, **{k: sum(r[k] for r in part) / 3 for k in TERMS}}
             for step, part in ((3, every[:3]), (6, every[3:6]))]
    assert_same_curve(threes, means, TERMS, rel=1e-6)

    forward, calls = LowRankClone.forward, []

    def sigterm_in_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # 2 micro-batches a step
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LowRankClone, "forward", sigterm_in_step_4)
    with pytest.raises(Preempted, match="after step 4"):  # inside the second interval
        train(tiny_cfg(tiny_job, tmp_path / "resumed", **interval))
    monkeypatch.setattr(LowRankClone, "forward", forward)
    train(tiny_cfg(tiny_job, tmp_path / "resumed", **interval))
    assert_same_curve(records(tmp_path / "resumed"), threes, TERMS, rel=1e-6)  # step 6: the mean of 4, 5, 6

    record = threes[-1]
    assert record["tokens_seen"] == 6 * 4 * 32 and record["skipped_steps"] == 0 and record["eta_s"] == 0
    assert record["step_time_s"] > 0 and record["tokens_per_s_per_device"] > 0 and record["mfu"] is None
    out = capsys.readouterr().out
    assert "parameters: 32.9K trainable" in out and "gradient accumulation 2: 4 sequences = 128 tokens per step" in out
    assert "backend none, one process" in out and "step 6/6 | loss" in out and "ETA 0:00:00" in out


def test_the_console_line_reads_as_progress():
    line = console_line(120, 366211, {"loss": 1.23456, "lm": 1.0, "kl": 0.2, "clone": 0.03, "grad_norm": 0.5, "lr": 1e-4,
                                      "tokens_seen": 5.9e6, "step_time_s": 1.5, "eta_s": 549136.5,
                                      "tokens_per_s_per_device": 12345.6, "mfu": 0.412, "memory_gb": 61.2,
                                      "skipped_steps": 0})
    assert line == ("step 120/366211 | loss 1.235 | lm 1 | kl 0.2 | clone 0.03 | grad_norm 0.5 | lr 0.0001 | "
                    "5.9M tokens | 1.5 s/step, ETA 6d 08:32 | 12,346 tok/s/device | MFU 41.2% | 61.20 GB")


@pytest.mark.parametrize("name, tflops", [("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989),
                                          ("NVIDIA H200", 989), ("NVIDIA B200", 2250)])
def test_peak_flops_are_known_for_the_common_gpus_and_overridable(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), None) == tflops * 1e12
    assert peak_flops(torch.device("cuda", 0), 500.0) == 500e12 and set(PEAK_BF16_FLOPS) >= {"A100", "H100", "B200"}


def test_no_kl_is_logged_without_a_kl_term(tiny_job):
    from lrc_dist.kd import KnowledgeDistillation, student_like
    from lrc_dist.losses import LossConfig
    from lrc_dist.model import CausalLM

    teacher = CausalLM.from_pretrained(tiny_job[0])
    ids = torch.randint(0, 300, (2, 16))
    lm_only = KnowledgeDistillation(student_like(teacher, 32, 0))  # method=lm: no teacher
    assert "kl" not in lm_only(ids, ids, LossConfig())[1]
    with_teacher = KnowledgeDistillation(student_like(teacher, 32, 0), teacher)
    assert "kl" in with_teacher(ids, ids, LossConfig())[1]
    assert "kl" not in with_teacher(ids, ids, LossConfig(kl_weight=0.0, dskd_weight=0.0))[1]


def test_the_dskd_projector_learns_at_its_own_scale(one_process, tiny_job, tmp_path):
    """t2s's entries are many times the projections': at their learning rate it hardly moves (its
    CE to the teacher's token stays put), at the scaled one it learns."""
    dskd = {"loss.dskd_weight": 0.5, "loss.kl_weight": 0.0, "steps": 12}
    ce = {}
    for name, scale in (("same lr", 1.0), ("scaled", None)):
        train(tiny_cfg(tiny_job, tmp_path / name, **dskd, **{"optim.dskd_projector_lr_scale": scale}))
        ce[name] = [r["dskd/ce_t2s"] for r in records(tmp_path / name)]
    assert ce["scaled"][-1] < ce["same lr"][-1] - 0.5 and ce["same lr"][-1] > 0.9 * ce["same lr"][0], ce
    state = json.loads((tmp_path / "scaled/step_00000012/train_state.json").read_text())
    assert state["config"]["optim"]["dskd_projector_lr_scale"] is None


def test_the_projector_scale_is_the_ratio_of_sizes_and_reaches_the_optimizer(tiny_job, tmp_path):
    from lrc_dist.build import build_model
    from lrc_dist.parallel import adamw, set_lr

    model = build_model(tiny_cfg(tiny_job, tmp_path, **{"loss.dskd_weight": 0.5}), torch.float32)
    t2s = model.dual_space.t2s
    projections = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and "dual" not in n]
    rms = lambda ts: (sum(float((t.detach()**2).sum()) for t in ts) / sum(t.numel() for t in ts)) ** 0.5  # noqa: E731
    assert model.dual_space.lr_scale == pytest.approx(rms([t2s]) / rms(projections)) and model.dual_space.lr_scale > 10
    optimizer = adamw(model, tiny_cfg(tiny_job, tmp_path))
    set_lr(optimizer, 1e-3)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(t2s)] == pytest.approx(1e-3 * model.dual_space.lr_scale) and lrs[id(projections[0])] == 1e-3


def test_an_agreement_collapse_is_warned_about_once():
    from lrc_dist.metrics import AgreementWatch

    watch = AgreementWatch()
    assert [watch.update(a) for a in (0.0, 0.06, 0.6, 0.9)] == [None] * 4  # rising from a poor start: no collapse
    assert "fell from 0.90 to 0.30" in watch.update(0.3)
    assert watch.update(0.0) is None and watch.update(None) is None  # once a run

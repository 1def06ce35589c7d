"""The dense phase in the trainer: the switch at lrc.dense_after, resumes before, across and after
it, FSDP2 and ZeRO-3 on the one-process curve, exports on both sides of it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_curve
from export_reference import assert_export_as_from_disk
from lrc_dist.build import build_model
from lrc_dist.checkpoint import read_train_state
from lrc_dist.config import config_of
from lrc_dist.export import read_trained_tensors
from lrc_dist.train import train
from test_train import CURVE_KEYS, run, tiny_cfg

DENSE = {"model.lrc.dense_after": 3, "checkpoint.export_interval": 3}  # 6 steps: LRC for 3, dense for 3
FROZEN = {**DENSE, "model.lrc.dense_projections": "freeze", "log.peak_tflops": 1.0}


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def trained(path):
    saved = read_train_state(path)
    cfg = config_of(saved["config"], str(path))
    return saved["dense"], read_trained_tensors(path, build_model(cfg, trained=True, dense=saved["dense"]))


@pytest.fixture(scope="module")
def dense_reference(tiny_job, tmp_path_factory):
    """One plain process through the switch: the curve every resume and backend must reproduce."""
    run_dir = tmp_path_factory.mktemp("dense_reference")
    return run(tiny_job, run_dir, 1, *(f"--{k}={v}" for k, v in DENSE.items())), run_dir


@pytest.fixture(scope="module")
def frozen_reference(tiny_job, tmp_path_factory):
    """The same with P_o and P_down frozen at the switch."""
    run_dir = tmp_path_factory.mktemp("frozen_reference")
    return run(tiny_job, run_dir, 1, *(f"--{k}={v}" for k, v in FROZEN.items())), run_dir


def test_the_run_switches_after_its_step_and_exports_both_phases(dense_reference, tmp_path):
    got, run_dir = dense_reference
    assert [trained(run_dir / f"step_{s:08d}")[0] for s in (3, 6)] == [False, True]
    dense, tensors = trained(run_dir / "step_00000006")
    assert "embed_dense" in tensors and "embed_proj" not in tensors
    lrc = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len(lrc) == 6 and lrc[-1]["loss"] < lrc[0]["loss"]
    for step in (3, 6):  # the export before the switch and the dense one, as from disk
        assert_export_as_from_disk(run_dir, step, tmp_path / "scratch")
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "export_00000006/hf")
    assert hf.config.hidden_size == 32


def test_resumes_before_across_and_after_the_switch_continue_exactly(one_process, dense_reference, tiny_job, tmp_path):
    want, ref_dir = dense_reference
    _, want_tensors = trained(ref_dir / "step_00000006")
    for stop in (2, 3, 4):  # resumed before the switch (it happens in the resumed run), at it, after it
        run_dir = tmp_path / f"stop_{stop}"
        train(tiny_cfg(tiny_job, run_dir, stop_at=stop, **DENSE))
        train(tiny_cfg(tiny_job, run_dir, **DENSE))
        assert_same_curve(records(run_dir), want, CURVE_KEYS)
        _, tensors = trained(run_dir / "step_00000006")
        assert set(tensors) == set(want_tensors)
        for k in want_tensors:
            assert torch.equal(tensors[k], want_tensors[k]), (stop, k)


def test_frozen_target_projections_through_the_trainer(frozen_reference, tiny_job, tmp_path):
    """dense_projections=freeze: P_o and P_down keep their values of the switch to the end, in the
    checkpoints and the export; the MFU counts each phase's own FLOPs."""
    got, run_dir = frozen_reference
    cfg = tiny_cfg(tiny_job, tmp_path, **FROZEN)
    tokens = cfg.micro_batch_size * cfg.data.seq_len
    flops = [build_model(cfg, trained=True, dense=d).flops_per_token(cfg.data.seq_len, tokens) for d in (False, True)]
    assert flops[1] < flops[0]
    for r in got:
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * flops[r["step"] > 3] / 1e12, rel=1e-9)
    (_, at_switch), (_, last) = trained(run_dir / "step_00000003"), trained(run_dir / "step_00000006")
    for i in range(2):
        for m in ("o", "down"):
            assert torch.equal(last[f"layers.{i}.frozen_proj.{m}"], at_switch[f"layers.{i}.proj.{m}"])
    assert not torch.equal(last["norm.weight"], at_switch["norm.weight"])
    assert_export_as_from_disk(run_dir, 6, tmp_path / "scratch")


def test_the_dskd_projector_keeps_its_learning_rate_through_the_switch_and_resumes(one_process, tiny_job, tmp_path):
    """The DSKD projector's lr scale comes from the initial weights (an svd init here): the dense
    model, and a resumed one, built on placeholder weights, must keep the run's."""
    dskd = {**DENSE, "loss.dskd_weight": 0.5, "model.lrc.init": "svd"}
    train(tiny_cfg(tiny_job, tmp_path / "ref", **dskd))
    scales = [read_train_state(tmp_path / f"ref/step_{s:08d}")["projector_lr_scale"] for s in (3, 6)]
    assert scales[0] == scales[1] and scales[0] is not None
    train(tiny_cfg(tiny_job, tmp_path / "resumed", stop_at=2, **dskd))
    train(tiny_cfg(tiny_job, tmp_path / "resumed", **dskd))
    assert_same_curve(records(tmp_path / "resumed"), records(tmp_path / "ref"), (*CURVE_KEYS, "dskd"))


def test_fsdp_resumed_across_the_switch_gives_the_one_process_curve(frozen_reference, tiny_job, tmp_path):
    """FSDP2 on 2 ranks (sharded teacher and weight generation) stopped before the switch and
    resumed: the switch gathers the sharded LRC model and shards the dense one, whose frozen
    target projections (buffers) go through its checkpoints."""
    flags = [f"--{k}={v}" for k, v in FROZEN.items()]
    fsdp = ["--parallel.backend=fsdp", "--parallel.teacher=shard", "--parallel.shard_generation=true"]
    run(tiny_job, tmp_path, 2, *fsdp, *flags, "--stop_at=2")
    assert_same_curve(run(tiny_job, tmp_path, 2, *fsdp, *flags), frozen_reference[0], CURVE_KEYS)
    assert_export_as_from_disk(tmp_path, 6, tmp_path / "scratch")


@pytest.mark.slow  # ~90 s; the FSDP variant above runs by default
def test_zero3_through_the_switch_and_resumed_after_it_gives_the_one_process_curve(dense_reference, tiny_job,
                                                                                   tmp_path):
    flags = [f"--{k}={v}" for k, v in DENSE.items()]
    run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed", *flags, "--stop_at=4")
    assert trained(tmp_path / "step_00000004")[0], "the checkpoint after the switch is of the dense phase"
    assert_same_curve(run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed", *flags), dense_reference[0],
                      CURVE_KEYS)
    assert_export_as_from_disk(tmp_path, 6, tmp_path / "scratch")

"""On-policy distillation (loss.on_policy_ratio): which windows the student continues, the batch
it makes of them, the loss on it against a direct computation, and the trainer's runs (resumed
exactly; different from off-policy)."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_curve, build_checkpoint
from lrc_dist.config import load_config
from lrc_dist.kd import KnowledgeDistillation, student_like
from lrc_dist.losses import IGNORE_INDEX, LossConfig
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.model import CausalLM
from lrc_dist.on_policy import (materialised_student, on_policy_batch, on_policy_samples, on_policy_seeds,
                                sampling_config)
from lrc_dist.parallel import full_tensors
from lrc_dist.preflight import problems
from lrc_dist.sampling import Decoder, generate
from lrc_dist.train import train
from test_train import CURVE_KEYS, run, tiny_cfg

CFG = LossConfig(temperature=2.0, on_policy_ratio=0.5, on_policy_new_tokens=5, on_policy_temperature=0.9)
WINDOWS = torch.randint(0, 256, (4, 13), generator=torch.Generator().manual_seed(2))  # 12 inputs + the last label


def test_exactly_the_ratio_of_the_stream_is_on_policy_whatever_the_world_size():
    ids = torch.arange(1000)
    for ratio in (0.0, 0.25, 0.3, 1.0):
        assert int(on_policy_samples(ids, ratio).sum()) == int(1000 * ratio)
    seeds = on_policy_seeds(ids, 0.5, seed=3)
    assert (seeds[on_policy_samples(ids, 0.5)] >= 0).all() and (seeds[~on_policy_samples(ids, 0.5)] == -1).all()
    assert len(set(seeds[seeds >= 0].tolist())) == 500  # a seed per sample
    assert torch.equal(on_policy_seeds(ids[500:], 0.5, 3), seeds[500:])  # any split of the stream agrees


def test_the_batch_keeps_the_prompt_samples_the_rest_and_masks_its_lm_labels(tmp_path):
    student = CausalLM.from_pretrained(build_checkpoint(tmp_path / "s", "qwen2"))
    seeds = torch.tensor([-1, 11, -1, 12])
    ids, labels, lm_labels, metrics = on_policy_batch(WINDOWS[:, :-1], WINDOWS[:, 1:], seeds,
                                                      Decoder.of(student), CFG)
    prompt = 13 - 5
    for row, seed in ((1, 11), (3, 12)):
        want = generate(student, WINDOWS[row : row + 1, :prompt], sampling_config(CFG),
                        [torch.Generator().manual_seed(seed)])[0]
        assert torch.equal(ids[row], want[:-1]) and torch.equal(labels[row], want[1:])
        assert (lm_labels[row, prompt - 1:] == IGNORE_INDEX).all()
        assert torch.equal(lm_labels[row, : prompt - 1], WINDOWS[row, 1:prompt])
    for row in (0, 2):
        assert torch.equal(ids[row], WINDOWS[row, :-1]) and torch.equal(lm_labels[row], WINDOWS[row, 1:])
    assert not torch.equal(ids, WINDOWS[:, :-1]), "the student's tokens differ from the data's"
    assert metrics["on_policy/generated_tokens"] == 10


def test_kd_loss_on_a_generated_batch_equals_a_direct_computation(tmp_path):
    teacher = CausalLM.from_pretrained(build_checkpoint(tmp_path / "t", "qwen2"))
    model = KnowledgeDistillation(student_like(teacher, 40, 0), teacher)
    ids, labels, lm_labels, _ = on_policy_batch(WINDOWS[:, :-1], WINDOWS[:, 1:], torch.tensor([-1, 11, -1, 12]),
                                                Decoder.of(model.student), CFG)
    loss, metrics = model(ids, labels, CFG, lm_labels=lm_labels)
    with torch.no_grad():
        z_s, z_t = model.student(ids).flatten(0, 1), teacher(ids).flatten(0, 1)
    n = labels.numel()  # every position is labelled (for the KL)
    lm = F.cross_entropy(z_s, lm_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / n
    t = CFG.temperature
    kl = F.kl_div(F.log_softmax(z_s / t, -1), F.log_softmax(z_t / t, -1), log_target=True, reduction="sum") / n
    assert metrics["lm"] == pytest.approx(lm.item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(metrics["lm"].item() + metrics["kl"].item(), rel=1e-5)


def test_lrc_samples_from_its_own_student_and_its_lm_term_skips_generated_labels(tmp_path):
    """The sampler's student is the LRC model's (materialised as its export: equal logits); the
    LM term on an on-policy batch is the cross-entropy of its LM labels alone."""
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "t", "llama3"), LRCConfig(40, init_std=0.1))
    student = materialised_student(model, functools.partial(full_tensors, model), torch.float32)
    ids, labels, lm_labels, _ = on_policy_batch(WINDOWS[:, :-1], WINDOWS[:, 1:], torch.tensor([7, -1, -1, -1]),
                                                Decoder.of(student), CFG)
    with torch.no_grad():
        logits = model.lockstep(ids).student_hidden @ model.student_head_weight().T
        assert ((student(ids) - logits).norm() / logits.norm()).item() < 1e-5
    _, metrics = model(ids, labels, CFG, lm_labels=lm_labels)
    lm = F.cross_entropy(logits.flatten(0, 1), lm_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert metrics["lm"] == pytest.approx(lm.item() / labels.numel(), rel=1e-5)


def test_on_policy_runs_resume_exactly_and_differ_from_off_policy(one_process, tiny_job, tmp_path):
    on = {"loss.on_policy_ratio": 0.5, "loss.on_policy_new_tokens": 8}
    train(tiny_cfg(tiny_job, tmp_path / "ref", **on))
    train(tiny_cfg(tiny_job, tmp_path / "resumed", stop_at=2, **on))
    train(tiny_cfg(tiny_job, tmp_path / "resumed", **on))
    train(tiny_cfg(tiny_job, tmp_path / "off"))

    def records(name):
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    assert_same_curve(records("resumed"), records("ref"), (*CURVE_KEYS, "on_policy/generated_tokens"))
    ref, off = records("ref"), records("off")
    assert all(r["on_policy/generated_tokens"] == 2 * 8 for r in ref)  # half of 4 windows per step, 8 tokens each
    assert 0 < ref[-1]["on_policy/time_share"] < 1
    assert ref[0]["kl"] != off[0]["kl"]  # the student's own tokens are graded
    assert ref[0]["lm"] < 0.95 * off[0]["lm"]  # the LM term counts 112 data tokens of 128


@pytest.mark.parametrize("overrides, message", [
    ({"loss.on_policy_ratio": 1.5}, "must be in \\[0, 1\\]"),
    ({"loss.on_policy_ratio": 0.5, "loss.on_policy_new_tokens": 0}, "on_policy_new_tokens=0"),
    ({"loss.on_policy_ratio": 0.5, "loss.on_policy_top_p": 0.0}, "on_policy_top_p"),
    ({"loss.on_policy_ratio": 0.5, "model.method": "lm"}, "needs a teacher"),
    ({"loss.on_policy_ratio": 0.5, "data.document_mask": True}, "data.document_mask"),
])
def test_bad_on_policy_settings_are_refused_naming_the_key(overrides, message):
    import re

    cfg = load_config(None, {"model.lrc.student_hidden_size": 40, "data.seq_len": 32, **overrides})
    assert any(re.search(message, p) for p in problems(cfg, 1)), problems(cfg, 1)


@pytest.fixture(scope="module")
def on_policy_reference(tiny_job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("on_policy_reference")
    return run(tiny_job, run_dir, 1, *ON_POLICY_FLAGS)


ON_POLICY_FLAGS = ("--loss.on_policy_ratio=0.5", "--loss.on_policy_new_tokens=8", "--loss.on_policy_top_p=0.9")


@pytest.mark.parametrize("backend", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_sharded_runs_on_two_ranks_sample_and_learn_as_one_process(on_policy_reference, tiny_job, tmp_path, backend):
    """The student is gathered part by part and materialised on each rank; each window is drawn
    from its own seed, so 2 ranks (FSDP2 with a sharded teacher, ZeRO-3) give the one-process curve."""
    extra = ("--parallel.teacher=shard",) if backend == "fsdp" else ()
    got = run(tiny_job, tmp_path, 2, f"--parallel.backend={backend}", *extra, *ON_POLICY_FLAGS)
    assert_same_curve(got, on_policy_reference, (*CURVE_KEYS, "on_policy/generated_tokens"))

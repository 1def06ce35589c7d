"""LRC's dense phase (lrc.dense_after): the student's matrices become free parameters set to their
W_T @ P, the clone terms stay, and the model is the same function at the switch; it trains,
exports to transformers and keeps or freezes the projections that map the clone targets."""

import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_checkpoint, rel_err
from lrc_dist.build import load_lrc
from lrc_dist.config import ConfigError, load_config
from lrc_dist.export import export_student, student_tensors
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.lrc_files import save_lrc
from lrc_dist.parallel import adamw
from lrc_dist.preflight import problems
from test_export import IDS, add_tokenizer, student_logits, trained_looking_clone


def loss_of(model: LowRankClone) -> tuple[torch.Tensor, dict]:
    return model(IDS, IDS, LossConfig(temperature=2.0))


def test_the_switch_keeps_the_function_and_trains_the_matrices(tmp_path, family):
    """Densified, the model gives the same loss terms, the same student (export tensors) and trains
    exactly the student's matrices, norms and the target projections P_o, P_down."""
    model = trained_looking_clone(build_checkpoint(tmp_path / "teacher", family), shared_attn_proj=True)
    want_loss, want_terms = loss_of(model)
    want_student = model.student_state_dict()
    model.densify()
    got_loss, got_terms = loss_of(model)
    assert rel_err(got_loss, want_loss) < 1e-5
    for k in want_terms:
        assert got_terms[k] == pytest.approx(want_terms[k].item(), rel=1e-4, abs=1e-7), k
    got_student = model.student_state_dict()
    assert list(got_student) == list(want_student)
    for k in want_student:
        torch.testing.assert_close(got_student[k], want_student[k], rtol=1e-5, atol=1e-7, msg=k)
    assert all(p.is_contiguous() for p in model.parameters()), "FSDP2 shards only contiguous parameters"
    names = set(model.trainable_state_dict())
    assert "embed_dense" in names and "embed_proj" not in names
    assert (("lm_head_dense" in names) == (not model.teacher_args.tie_word_embeddings)) and "lm_head_proj" not in names
    assert {n.split(".", 2)[2] for n in names if n.startswith("layers.0.")} == {
        *(f"dense.{m}" for m in ("q", "k", "v", "o", "gate", "up", "down")), "proj.o", "proj.down",
        *model.layers[0].norm_names.values()}


def test_frozen_target_projections_stay_and_are_saved(tmp_path):
    """dense_projections=freeze: P_o and P_down become buffers that no step changes but that the
    trainable state (checkpoints, lrc/) carries; `train`: they move with the clone terms."""
    teacher = build_checkpoint(tmp_path / "teacher", "qwen2")
    moved = {}
    for mode in ("train", "freeze"):
        model = trained_looking_clone(teacher, dense_projections=mode)
        model.densify()
        p_o = model.layers[0].p("o").detach().clone()
        dense_q = model.layers[0].dense["q"].detach().clone()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            loss_of(model)[0].backward()
            optimizer.step()
            optimizer.zero_grad()
        moved[mode] = not torch.equal(model.layers[0].p("o"), p_o)
        assert not torch.equal(model.layers[0].dense["q"], dense_q), "the dense matrices must train"
        state = model.trainable_state_dict()
        assert ("layers.0.frozen_proj.o" in state) == (mode == "freeze")
        assert ("layers.0.proj.o" in state) == (mode == "train")
        save_lrc(model, tmp_path / mode, teacher)
        reloaded = load_lrc(tmp_path / mode)
        assert reloaded.dense and torch.equal(reloaded.layers[0].p("o"), model.layers[0].p("o"))
        assert torch.equal(loss_of(reloaded)[0], loss_of(model)[0])
    assert moved == {"train": True, "freeze": False}


def test_dense_export_is_the_trained_student_in_transformers(tmp_path, family):
    teacher = build_checkpoint(tmp_path / "teacher", family)
    add_tokenizer(teacher)
    model = trained_looking_clone(teacher)
    model.densify()
    with torch.no_grad():  # leave the teacher's column space, as training does
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    hf = AutoModelForCausalLM.from_pretrained(export_student(model, tmp_path / "student", teacher)).eval()
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, student_logits(model)) < 1e-5


def test_dense_parts_name_every_parameter_they_read(tmp_path, family):
    """From the full values of only the parameters each part names (all others NaN, as a sharded
    model's would be), the dense state and, once densified, the student come out whole."""
    model = trained_looking_clone(build_checkpoint(tmp_path / "teacher", family), shared_ffn_proj=True)
    real = dict(model.named_parameters())

    @contextlib.contextmanager
    def gathered(names):
        yield {n: real[n] for n in names}

    blank = copy.deepcopy(model)
    with torch.no_grad():
        for p in blank.parameters():
            p.fill_(float("nan"))
    from lrc_dist.export import full_parameters

    state = {}
    for names, part in blank.dense_parts():
        with full_parameters(blank, gathered, names, True):
            state.update({k: v.detach().clone() for k, v in part().items()})
    dense = copy.deepcopy(model)
    dense.densify()
    want = dense.trainable_state_dict()
    assert set(state) == set(want)
    for k in want:
        assert torch.equal(state[k], want[k]), k
    real = dict(dense.named_parameters())
    blank = copy.deepcopy(dense)
    with torch.no_grad():
        for p in blank.parameters():
            p.fill_(float("nan"))
    got = student_tensors(blank, gathered, torch.float32)
    for k, v in dense.student_state_dict().items():
        assert torch.equal(got[k], v), k


def test_dense_lr_scale_sets_the_matrices_learning_rate(tmp_path):
    """lrc.dense_lr_scale: the dense matrices get their own AdamW group (0 holds them still)."""
    cfg = load_config(None, {"model.lrc.student_hidden_size": 40, "model.lrc.dense_after": 0.5,
                             "model.lrc.dense_lr_scale": 0.0})
    model = trained_looking_clone(build_checkpoint(tmp_path / "teacher", "qwen2"), dense_lr_scale=0.0)
    model.densify()
    optimizer = adamw(model, cfg)
    assert sorted(g["lr_scale"] for g in optimizer.param_groups) == [0.0, 1.0]
    for group in optimizer.param_groups:
        group["lr"] = 1e-2 * group["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_of(model)[0].backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            dense = n in ("embed_dense", "lm_head_dense") or ".dense." in n
            assert torch.equal(p, before[n]) == dense, n


@pytest.mark.parametrize("overrides, message", [
    ({"model.lrc.dense_after": 1.5}, "whole number"),
    ({"model.lrc.dense_after": -0.1}, "whole number"),
    ({"model.lrc.dense_after": 0.5, "model.lrc.attn_out_space": "teacher"}, "attn_out_space=student"),
])
def test_bad_dense_after_is_refused_naming_the_key(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(None, {"model.lrc.student_hidden_size": 40, **overrides})


def test_a_dense_phase_that_never_starts_is_refused():
    cfg = load_config(None, {"model.lrc.student_hidden_size": 40, "model.lrc.dense_after": 10, "steps": 10})
    assert any("model.lrc.dense_after=10" in p and "never" in p for p in problems(cfg, 1))
    cfg = load_config(None, {"model.lrc.student_hidden_size": 40, "model.lrc.dense_after": 0.004, "steps": 100})
    assert any("rounds to step 0" in p for p in problems(cfg, 1))
    cfg = load_config(None, {"model.method": "kd", "model.lrc.dense_after": 0.5, "steps": 10})
    assert any("model.method=kd" in p for p in problems(cfg, 1))

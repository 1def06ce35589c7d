"""The family registry: every entry is tested, its rules give clear errors, and the families beyond
Llama-style (Gemma-3, Phi-3) train through the CLI into exports equal to the LRC student."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES as TEST_CONFIGS
from conftest import build_checkpoint, rel_err
from lrc_dist.build import load_lrc
from lrc_dist.families import FAMILIES, ModelArgs, fuse_layer, hf_layer_shapes, split_layer
from lrc_dist.model import CausalLM, CheckpointError
from test_train import run


def test_every_registered_family_has_a_test_config():
    """The parity, LRC and export tests run on conftest.FAMILIES: each registry entry must be there."""
    assert {config().model_type for config in TEST_CONFIGS.values()} == set(FAMILIES)
    for config in TEST_CONFIGS.values():
        assert type(config()).__name__ == FAMILIES[config().model_type].config_class


@pytest.mark.parametrize("family", ["phi3", "gemma3", "qwen2"])
def test_split_and_fuse_are_inverse_and_cover_the_hf_tensors(family):
    args = ModelArgs.from_hf(TEST_CONFIGS[family]())
    g = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=g) for name, shape in hf_layer_shapes(args).items()}
    weights = split_layer(args, hf)
    assert set(weights) == set(args.family.names)
    back = fuse_layer(args, weights)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_phi3_fused_matrices_split_in_hf_order(tmp_path):
    model = CausalLM.from_pretrained(build_checkpoint(tmp_path / "phi3", "phi3"))
    layer, a = model.model.layers[0], model.args
    w, q = layer.weights(), a.num_heads * a.head_dim
    fused = layer.self_attn.qkv_proj.weight
    assert torch.equal(w["q"], fused[:q]) and torch.equal(w["v"], fused[-a.num_kv_heads * a.head_dim:])
    assert torch.equal(w["up"], layer.mlp.gate_up_proj.weight[a.intermediate_size:])


@pytest.mark.parametrize("key, value", [("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                                        ("use_bidirectional_attention", True)])
def test_a_gemma_setting_lrc_dist_does_not_run_is_named(tmp_path, key, value):
    path = build_checkpoint(tmp_path / "g", "gemma3", **{key: value})
    with pytest.raises(CheckpointError, match=f"{key}=.*set it to"):
        CausalLM.from_pretrained(path)


def test_a_multimodal_gemma_points_to_its_text_model(tmp_path):
    path = build_checkpoint(tmp_path / "g", "gemma3")
    cfg = json.loads((Path(path) / "config.json").read_text())
    (Path(path) / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3"}))
    with pytest.raises(CheckpointError, match="text model"):
        CausalLM.from_pretrained(path)


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_lrc_trains_through_the_cli_and_exports_the_student(tiny_job, tmp_path, family):
    """A teacher of the family, the tiny job's tokenizer and tokens: three steps through the CLI,
    then the exported HF model (plain transformers) gives the LRC student's logits."""
    qwen_teacher, tokens = tiny_job
    teacher = build_checkpoint(tmp_path / "teacher", family, vocab_size=300)
    for f in Path(qwen_teacher).glob("tokenizer*"):
        shutil.copy(f, teacher)
    records = run((teacher, tokens), tmp_path / "run", 1, "--steps=3", "--checkpoint.interval=3")
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    export = tmp_path / "run/export_00000003"
    hf = AutoModelForCausalLM.from_pretrained(export / "hf", dtype=torch.float32).eval()
    assert hf.config.model_type == FAMILIES[hf.config.model_type].model_type and hf.config.hidden_size == 32
    lrc = load_lrc(export / "lrc")
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = lrc.lockstep(ids).student_hidden @ lrc.student_head_weight().T
        assert rel_err(hf(ids).logits, student) < 1e-5

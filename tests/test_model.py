"""Our decoder vs transformers on tiny random checkpoints of every family, and loader errors."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_checkpoint, rel_err
from lrc_dist.model import CausalLM, CheckpointError


def test_logits_match_transformers(checkpoint):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = CausalLM.from_pretrained(checkpoint)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert rel_err(got, expected) < 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    path = tmp_path / "sharded"
    ref = AutoModelForCausalLM.from_pretrained(build_checkpoint(tmp_path / "one", "qwen2"))
    ref.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert rel_err(CausalLM.from_pretrained(path)(ids), ref(ids).logits) < 1e-5


def test_unsupported_architecture(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama2")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ValueError), match="gpt2"):
        CausalLM.from_pretrained(path)


def test_missing_weights(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama2")
    (tmp_path / "m/model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CausalLM.from_pretrained(path)
    shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        CausalLM.from_pretrained(path)


def test_config_weights_mismatch(tmp_path):
    path = build_checkpoint(tmp_path / "m", "qwen3")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg.pop("layer_types")
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing.*layers.2"):
        CausalLM.from_pretrained(path)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.*shape"):
        CausalLM.from_pretrained(path)


def test_a_truncated_weight_file_is_named(tmp_path):
    path = build_checkpoint(tmp_path / "m", "qwen2")
    weights = tmp_path / "m/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read .*truncated or corrupt"):
        CausalLM.from_pretrained(path)


def test_a_tied_config_with_a_separate_head_is_an_error(tmp_path):
    import json

    path = build_checkpoint(tmp_path / "m", "qwen2", tie_word_embeddings=False)  # a real, separate lm_head
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true, but the weights hold an lm_head.weight"):
        CausalLM.from_pretrained(path)


@pytest.mark.parametrize("name", ["silu", "swish", "gelu", "relu", "gelu_pytorch_tanh"])
def test_activations_are_transformers_own(name):
    """model.activation computes the named activation exactly as transformers' ACT2FN does."""
    from transformers.activations import ACT2FN

    from lrc_dist.model import activation

    x = torch.randn(4096) * 4
    assert torch.equal(activation(name)(x), ACT2FN[name](x))


def test_the_trainer_imports_without_transformers_activations():
    """transformers.activations costs ~3 s per process (every rank, every --help): not imported."""
    import subprocess
    import sys

    code = "import sys, lrc_dist.train; print('transformers.activations' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

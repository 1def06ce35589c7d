"""The exported student is a plain HF model whose logits equal the LRC student's; it is
materialised part by part, each part reading only the parameters it names."""

import contextlib
import copy
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import build_checkpoint, randomize_, rel_err
from lrc_dist.export import export_student, student_tensors
from lrc_dist.kd import KnowledgeDistillation, student_like
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.lrc_files import save_lrc
from lrc_dist.model import CausalLM, CheckpointError
from lrc_dist.parallel import full_tensors

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


def add_tokenizer(path) -> None:
    vocab = {f"t{i}": i for i in range(255)} | {"<eos>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def trained_looking_clone(teacher: str, **cfg) -> LowRankClone:
    """A clone with nontrivial projections and norms, as after training; d_S=40 is not divisible by 4 heads."""
    model = LowRankClone.from_teacher(teacher, LRCConfig(40, rms_norm_eps=1e-6, init_std=0.1, **cfg), seed=1)
    randomize_(model.norm)
    for block in model.layers:
        randomize_(block.input_layernorm, seed=2)
    return model


def student_logits(model: LowRankClone) -> torch.Tensor:
    with torch.no_grad():
        return model.lockstep(IDS).student_hidden @ model.student_head_weight().T


def test_export_matches_lrc_student(tmp_path, family):
    teacher = build_checkpoint(tmp_path / "teacher", family)
    add_tokenizer(teacher)
    model = trained_looking_clone(teacher)
    hf = AutoModelForCausalLM.from_pretrained(export_student(model, tmp_path / "student", teacher)).eval()
    cfg = hf.config
    assert (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps) == (40, 24, 1e-6)
    assert cfg.tie_word_embeddings == model.teacher_args.tie_word_embeddings
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, student_logits(model)) < 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "student").eos_token == "<eos>"


def test_cli_roundtrip_through_saved_lrc(tmp_path):
    teacher = build_checkpoint(tmp_path / "teacher", "qwen2")
    model = trained_looking_clone(teacher, shared_attn_proj=True)
    save_lrc(model, tmp_path / "lrc", teacher)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 3e-2)):
        out = tmp_path / f"student_{dtype}"
        subprocess.run([sys.executable, "-m", "lrc_dist.export", str(tmp_path / "lrc"), str(out), "--dtype", dtype],
                       check=True, capture_output=True)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert rel_err(hf(IDS).logits, student_logits(model)) < tol


def test_cli_rejects_a_non_lrc_dir(tmp_path):
    from lrc_dist.export import main

    with pytest.raises(CheckpointError, match="lrc_config.json"):
        main(str(tmp_path), str(tmp_path / "out"))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)  # the same order too: it decides which tensors share a shard file
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_parts_give_the_student_state_dict_from_the_parameters_they_name(tmp_path, family):
    """Part by part, from the full values of only the parameters each part names (all others NaN,
    as a sharded model's would be unavailable), the student equals `student_state_dict`."""
    teacher = build_checkpoint(tmp_path / "teacher", family)
    clone = trained_looking_clone(teacher, shared_ffn_proj=True)
    t = CausalLM.from_pretrained(teacher)
    for model in (clone, KnowledgeDistillation(student_like(t, 40, 0), t)):
        blank = copy.deepcopy(model)
        with torch.no_grad():
            for p in blank.parameters():
                p.fill_(float("nan"))
        real = dict(model.named_parameters())

        @contextlib.contextmanager
        def gathered(names):
            yield {n: real[n] for n in names}

        assert_same_state(student_tensors(blank, gathered, torch.float32), model.student_state_dict())
        assert all(p.isnan().all() for p in blank.parameters()), "a part left a gathered value in the model"


def test_a_bf16_model_exports_as_its_fp32_rebuild(tmp_path):
    """A bf16 run holds its teacher in bf16: materialised from it (in fp32), the student is the one
    an fp32 model built from the same (bf16) teacher weights gives, rounded once to bf16."""
    rebuilt = trained_looking_clone(build_checkpoint(tmp_path / "teacher", "qwen2"))
    frozen = [n for n, p in rebuilt.named_parameters() if not p.requires_grad]
    with torch.no_grad():
        for n in frozen:
            rebuilt.get_parameter(n).copy_(rebuilt.get_parameter(n).bfloat16())
    live = copy.deepcopy(rebuilt)
    for n in frozen:
        live.get_parameter(n).data = live.get_parameter(n).data.bfloat16()
    want = {k: v.bfloat16() for k, v in rebuilt.student_state_dict().items()}
    assert_same_state(student_tensors(live, lambda names: full_tensors(live, names), torch.bfloat16), want)

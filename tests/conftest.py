"""Tiny random Hugging Face checkpoints of every supported family, built offline from configs."""

import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24,  # head_dim != hidden/heads on purpose
    max_position_embeddings=256, rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama2": lambda **kw: LlamaConfig(**{**TINY, "num_key_value_heads": 4, **kw}),
    "llama3": lambda **kw: LlamaConfig(**{**TINY, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "tie_word_embeddings": True, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, "rope_theta": 1e6, "tie_word_embeddings": False, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**TINY, "tie_word_embeddings": True, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**TINY, "sliding_window": 8, **kw}),  # window < test seq len
    # local and global layers with their own RoPE bases, a query scale other than head_dim, GeGLU
    "gemma3": lambda **kw: Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3, "sliding_window": 8,
                                              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                              "rope_parameters": {
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                  "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}},
                                              "query_pre_attn_scalar": 16, "pad_token_id": 0, **kw}),
    # fused qkv and gate_up, half the head rotated, a sliding window
    "phi3": lambda **kw: Phi3Config(**{**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                    "partial_rotary_factor": 0.5},
                                       "sliding_window": 12, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                       "tie_word_embeddings": False, **kw}),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (norm weights near 1, biases nonzero) so parity tests bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


def build_checkpoint(path, family: str, seed: int = 0, **overrides) -> str:
    config = FAMILIES[family](**overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(path)
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process(monkeypatch):
    """Env for an in-process single-rank run; the process group is torn down afterwards."""
    port = free_port()
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def checkpoint(tmp_path, family):
    return build_checkpoint(tmp_path / family, family)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same_curve(got: list[dict], want: list[dict], keys: tuple[str, ...], **approx) -> None:
    """Two runs' metrics records: the same steps, and every key equal at each (pytest.approx,
    rel=1e-5 unless `approx` says otherwise)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in keys:
            assert g[key] == pytest.approx(w[key], **{"rel": 1e-5, **approx}), (g["step"], key)


# ---- a tiny but real training job: tokenizer, teacher and token set, all built offline ----------

WORDS = ("the model learns small students from large teachers while tokens flow through layers of "
         "attention and feed forward networks with low rank projections cloning every activation").split()


def write_corpus(path, docs: int = 200, seed: int = 0) -> None:
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "."
            f.write(json.dumps({"text": text}) + "\n")


def build_tokenizer(path, corpus, vocab_size: int = 300, special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> None:
    from lrc_dist.demo import train_tokenizer

    train_tokenizer(corpus, path, vocab_size, special_tokens)


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """(teacher dir with its tokenizer, token-set dir): a teacher of vocab 300 and a corpus for it."""
    from lrc_dist.pretokenize import tokenize_corpus

    root = tmp_path_factory.mktemp("job")
    write_corpus(root / "corpus.jsonl")
    teacher = build_checkpoint(root / "teacher", "qwen2", vocab_size=300)
    build_tokenizer(teacher, root / "corpus.jsonl")
    tokenize_corpus(str(root / "corpus.jsonl"), teacher, str(root / "tokens"), workers=1, progress=False)
    return teacher, str(root / "tokens")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """(out dir, stdout) of `python -m lrc_dist.demo --preset quick --dskd`, run once a session:
    its teacher, token sets and exports serve the README's commands too."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("runs") / "demo_quick"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "lrc_dist.demo", "--out", str(out), "--preset", "quick", "--dskd"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout

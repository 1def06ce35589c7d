"""Evaluation: perplexity against a direct computation with lrc_dist's model, the multiple-choice
scorer against lm-evaluation-harness (`--model hf`) on the shipped task."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lrc_dist.data import TokenSet
from lrc_dist.evaluate import SHIPPED_TASKS, choice, effective_rank, harness, perplexity, read_task
from lrc_dist.model import CausalLM

TASK = SHIPPED_TASKS / "pydoc_cloze.jsonl"


def test_perplexity_equals_direct_computation(tiny_job):
    teacher, tokens = tiny_job
    got = perplexity(teacher, tokens, seq_len=16, max_windows=10, batch_size=3, progress=False)
    token_set, model = TokenSet.open(tokens), CausalLM.from_pretrained(teacher)
    windows = torch.as_tensor(np.stack([token_set.read(w * 17, 17) for w in range(10)]).astype(np.int64))
    nll = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
    assert got["tokens"] == 160
    assert got["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    # bits per byte: over the text the targets spell (the corpus is ASCII), EOS one byte each
    tokenizer = Tokenizer.from_file(f"{teacher}/tokenizer.json")
    eos = tokenizer.token_to_id("<|endoftext|>")
    text = sum(len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True).encode()) for w in windows)
    num_bytes = text + int((windows[:, 1:] == eos).sum())
    assert got["bits_per_byte"] == pytest.approx(nll.item() * 160 / math.log(2) / num_bytes, rel=1e-5)


def test_perplexity_rejects_a_token_set_of_another_tokenizer(tiny_job, tmp_path):
    from conftest import build_checkpoint

    _, tokens = tiny_job
    other = build_checkpoint(tmp_path / "other", "llama2", vocab_size=200)
    with pytest.raises(ValueError, match="vocab"):
        perplexity(other, tokens, seq_len=16, progress=False)


def test_choice_matches_lm_evaluation_harness(tiny_job, tmp_path):
    pytest.importorskip("lm_eval")
    teacher, _ = tiny_job
    ours = choice(teacher, str(TASK), progress=False)
    theirs = harness(teacher, "pydoc_cloze", batch_size=4)["pydoc_cloze"]
    assert ours["items"] == len(read_task(TASK)) == 120
    assert ours["acc"] == pytest.approx(theirs["acc"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm"], abs=1e-9)


def test_choice_accuracy_flips_with_the_answers(tiny_job, tmp_path):
    """Two choices per item: moving the gold label to the other choice turns acc into 1 - acc."""
    teacher, _ = tiny_job
    items = read_task(TASK)[:30]
    two = [{**it, "choices": [it["choices"][it["gold"]], it["choices"][(it["gold"] + 1) % 4]], "gold": 0} for it in items]
    flipped = [{**it, "gold": 1} for it in two]
    for name, task in (("two", two), ("flipped", flipped)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in task))
    a = choice(teacher, str(tmp_path / "two.jsonl"), progress=False)["acc"]
    b = choice(teacher, str(tmp_path / "flipped.jsonl"), progress=False)["acc"]
    assert a + b == pytest.approx(1.0)


def test_bad_task_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"query": "q", "choices": ["a"], "gold": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_task(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_task(tmp_path / "none.jsonl")


def test_effective_rank_of_matrices_of_known_rank():
    g = torch.Generator().manual_seed(0)
    q_rows, _ = torch.linalg.qr(torch.randn(200, 5, generator=g))
    q_cols, _ = torch.linalg.qr(torch.randn(16, 5, generator=g))
    assert effective_rank(3.0 * q_rows @ q_cols.T) == pytest.approx(5, rel=1e-6)  # five equal singular values
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    p = s[:4] / s.sum()
    assert effective_rank(q_rows @ torch.diag(s) @ q_cols.T) == pytest.approx(math.exp(-(p * p.log()).sum()), rel=1e-6)
    assert effective_rank(torch.ones(3, 7, 16)) == pytest.approx(1.0)  # [..., d]: every position the same state

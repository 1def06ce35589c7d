"""The KV-cache sampler: incremental logits equal a full forward's, for every family (sliding
windows shorter than the sequence included); sampling equals drawing from full forwards step by
step; the nucleus and the temperature do what they say; a seed gives the same tokens."""

import pytest
import torch

from conftest import rel_err
from lrc_dist.model import CausalLM
from lrc_dist.sampling import CachedAttention, SamplingConfig, forward_chunk, generate, sample_next

PROMPTS = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(3))


def test_incremental_logits_equal_a_full_forward(checkpoint):
    """Prefill 7 tokens, then one at a time to 20 (past every tiny family's sliding window)."""
    model = CausalLM.from_pretrained(checkpoint)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    caches = [CachedAttention(20) for _ in model.model.layers]
    with torch.no_grad():
        want = model(ids)
        got = [forward_chunk(model, ids[:, :7], caches, 0)]
        got += [forward_chunk(model, ids[:, t : t + 1], caches, t) for t in range(7, 20)]
    assert rel_err(torch.cat(got, dim=1), want) < 1e-5


def test_sampling_equals_drawing_from_full_forwards(checkpoint):
    model = CausalLM.from_pretrained(checkpoint)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9)
    got = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(0))
    g, seq = torch.Generator().manual_seed(0), PROMPTS
    with torch.no_grad():
        for _ in range(cfg.max_new_tokens):
            seq = torch.cat([seq, sample_next(model(seq)[:, -1], cfg, g)[:, None]], dim=1)
    assert torch.equal(got, seq)
    assert torch.equal(got, generate(model, PROMPTS, cfg, torch.Generator().manual_seed(0))), "a seed, one result"
    assert not torch.equal(got, generate(model, PROMPTS, cfg, torch.Generator().manual_seed(1)))


def test_nucleus_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)

    def freq(cfg):
        return torch.bincount(sample_next(logits, cfg, g), minlength=4).float() / len(logits)

    assert torch.equal(freq(SamplingConfig(temperature=0)), torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(freq(SamplingConfig(top_p=0.5)), torch.tensor([1.0, 0, 0, 0]))  # 0.5 alone reaches it
    nucleus = freq(SamplingConfig(top_p=0.75))  # {0.5, 0.3}, renormalised
    assert nucleus[2:].sum() == 0 and nucleus[0] == pytest.approx(0.625, abs=0.03)
    assert freq(SamplingConfig())[3] == pytest.approx(0.05, abs=0.015)
    assert freq(SamplingConfig(temperature=0.25))[0] > 0.85  # p^4, renormalised: 0.88
    diverged = torch.tensor([[0.0, float("nan"), 1.0, 2.0]]).expand(4000, 4)
    assert torch.bincount(sample_next(diverged, SamplingConfig(), g), minlength=4).min() > 800  # uniform, no crash


def test_rows_that_end_are_padded_with_eos(tmp_path):
    from conftest import build_checkpoint

    model = CausalLM.from_pretrained(build_checkpoint(tmp_path / "m", "qwen2"))
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0))
    eos = int(greedy[0, 8])  # row 0's second new token: it must end row 0 there
    got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0), eos_id=eos)
    assert got.shape == (3, 13) and (got[0, 8:] == eos).all()
    assert torch.equal(got[0, :9], greedy[0, :9])


@pytest.mark.parametrize("kw", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)

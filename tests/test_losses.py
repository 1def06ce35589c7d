"""The chunked head losses against direct PyTorch formulas: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from lrc_dist.losses import IGNORE_INDEX, LossConfig, head_losses


def direct(h_s, w_s, h_t, w_t, labels, cfg, normalizer):
    z_s, z_t = (h_s @ w_s.T).float(), (h_t @ w_t.T).float()
    valid = labels != IGNORE_INDEX
    lm = F.cross_entropy(z_s, labels, ignore_index=IGNORE_INDEX, reduction="sum") / normalizer
    T = cfg.temperature
    kl_tok = F.kl_div(F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1), log_target=True, reduction="none").sum(-1)
    kl = (kl_tok * valid).sum() / normalizer
    return cfg.lm_weight * lm + cfg.kl_weight * kl, lm, kl


def inputs(n=37, d_s=8, d_t=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d_s, generator=g, requires_grad=True)
    w_s = torch.randn(vocab, d_s, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(n, d_t, generator=g), torch.randn(vocab, d_t, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return h_s, w_s, h_t, w_t, labels


@pytest.mark.parametrize("chunk", [1, 7, 37, None])
@pytest.mark.parametrize("temperature", [1.0, 40.0])
def test_values_and_grads_match_direct_formulas(chunk, temperature):
    cfg = LossConfig(lm_weight=0.7, kl_weight=2.5, temperature=temperature, chunk_tokens=chunk)
    h_s, w_s, h_t, w_t, labels = inputs()
    n_valid = int((labels != IGNORE_INDEX).sum())
    total, lm, kl = head_losses(h_s, w_s, h_t, w_t, labels, cfg)
    grads = torch.autograd.grad(3.0 * total, (h_s, w_s))  # a non-unit upstream gradient
    ref_total, ref_lm, ref_kl = direct(h_s, w_s, h_t, w_t, labels, cfg, n_valid)
    ref_grads = torch.autograd.grad(3.0 * ref_total, (h_s, w_s))
    for got, want in [(total, ref_total), (lm, ref_lm), (kl, ref_kl), *zip(grads, ref_grads)]:
        assert rel_err(got, want) < 1e-5
    assert kl > 0 and not lm.requires_grad and not kl.requires_grad


def test_global_normalizer_and_no_teacher():
    h_s, w_s, h_t, w_t, labels = inputs()
    cfg = LossConfig(kl_weight=1.0)
    total, lm, kl = head_losses(h_s, w_s, None, None, labels, cfg, normalizer=100)
    ref = F.cross_entropy(h_s @ w_s.T, labels, ignore_index=IGNORE_INDEX, reduction="sum") / 100
    assert rel_err(total, ref) < 1e-6 and kl == 0


def test_identical_models_have_zero_kl():
    h_s, w_s, _, _, labels = inputs(d_t=8)
    _, _, kl = head_losses(h_s, w_s, h_s.detach(), w_s.detach(), labels, LossConfig())
    assert abs(kl.item()) < 1e-6

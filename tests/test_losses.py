"""The chunked head losses against direct PyTorch formulas: values and gradients."""

import functools

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


# ---- the divergence zoo, against formulas written directly on probabilities (float64) ------------


def _kl(a, b):
    return (a * (a / b).log()).sum(-1)


def direct_divergence(name, p, q, skew=0.1):
    """p teacher, q student probabilities (after temperature)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "js":
        m = (p + q) / 2
        return (_kl(p, m) + _kl(q, m)) / 2
    if name == "skewed_forward_kl":
        return _kl(p, skew * p + (1 - skew) * q)
    if name == "skewed_reverse_kl":
        return _kl(q, (1 - skew) * p + skew * q)
    if name == "tvd":
        return (p - q).abs().sum(-1) / 2
    if name == "adaptive_kl":
        out = []
        for pi, qi in zip(p, q):
            order = sorted(range(len(pi)), key=lambda j: pi[j].item())
            mass, tail = 0.0, set()
            for j in order:
                mass += pi[j].item()
                if mass <= 0.5:
                    tail.add(j)
            gap = (pi - qi).abs().detach()
            g_tail = sum(gap[j] for j in tail) if tail else torch.tensor(0.0, dtype=p.dtype)
            g_head = gap.sum() - g_tail
            w = g_head / (g_head + g_tail)
            out.append(w * _kl(pi, qi) + (1 - w) * _kl(qi, pi))
        return torch.stack(out)
    raise KeyError(name)


DIVERGENCE_NAMES = ["forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "adaptive_kl", "tvd"]


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_divergences_match_direct_formulas(name):
    h_s, w_s, h_t, w_t, labels = (t.double() if t.is_floating_point() else t for t in inputs(vocab=30))
    h_s.requires_grad_(True)
    w_s = w_s.detach().requires_grad_(True)
    cfg = LossConfig(lm_weight=0.3, kl_weight=1.7, temperature=2.0, divergence=name, skew=0.2, chunk_tokens=8)
    n_valid = int((labels != IGNORE_INDEX).sum())
    total, lm, kd = head_losses(h_s, w_s, h_t, w_t, labels, cfg)
    p = torch.softmax(h_t @ w_t.T / 2.0, -1)
    q = torch.softmax(h_s @ w_s.T / 2.0, -1)
    valid = labels != IGNORE_INDEX
    ref_kd = (direct_divergence(name, p, q, skew=0.2) * valid).sum() / n_valid
    ref_lm = F.cross_entropy(h_s @ w_s.T, labels, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid
    ref_total = 0.3 * ref_lm + 1.7 * ref_kd
    # The loss math runs in fp32 by design; the reference is float64.
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5) and kd > 0
    grads = torch.autograd.grad(total, (h_s, w_s))
    ref_grads = torch.autograd.grad(ref_total, (h_s, w_s))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_closed_form_gradients_match_autograd(name):
    """GRADIENTS[name] (what the head kernels use) gives D and dD/ds, s the temperature-scaled
    student logits, equal to autograd through DIVERGENCES[name] (float64, a weighted sum of rows)."""
    from lrc_dist.divergences import divergence_fn, divergence_grad_fn

    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(6, 13, generator=g, dtype=torch.float64)).requires_grad_(True)
    logp = torch.log_softmax(3 * torch.randn(6, 13, generator=g, dtype=torch.float64), -1)
    row_weights = torch.randn(6, generator=g, dtype=torch.float64)
    value = divergence_fn(name, 0.2)(torch.log_softmax(s, -1), logp)
    (want,) = torch.autograd.grad((value * row_weights).sum(), s)
    got_value, got = divergence_grad_fn(name, 0.2)(torch.log_softmax(s.detach(), -1), logp)
    assert torch.allclose(got_value, value, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got * row_weights.unsqueeze(1), want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3  # a gradient worth comparing


def test_divergence_properties_and_errors():
    from lrc_dist.divergences import DIVERGENCES

    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, -1)
    logq = torch.log_softmax(logits.flip(-1), -1)
    for name, fn in DIVERGENCES.items():
        assert torch.allclose(fn(logp, logp), torch.zeros(5), atol=1e-6), name  # D(p || p) = 0
        assert (fn(logq, logp) > 0).all(), name
    assert torch.allclose(DIVERGENCES["js"](logq, logp), DIVERGENCES["js"](logp, logq))  # JS is symmetric
    assert (DIVERGENCES["tvd"](logq, logp) <= 1).all()
    h_s, w_s, h_t, w_t, labels = inputs()
    with pytest.raises(ValueError, match="loss.divergence='kl2'"):
        head_losses(h_s, w_s, h_t, w_t, labels, LossConfig(divergence="kl2"))


FAULTS = """
import resource, sys, torch
from lrc_dist.losses import LossConfig, head_losses
from lrc_dist.resources import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
torch.manual_seed(0)
V, N, d = 32000, 512, 64  # the logits of 512 tokens: 64 MiB in fp32, mmapped by glibc's defaults
h_s, w_s = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
h_t, w_t, labels = torch.randn(N, d), torch.randn(V, d), torch.randint(0, V, (N,))
cfg = LossConfig(kl_weight=1.0, chunk_tokens=int(sys.argv[2]) if sys.argv[2] != "default" else None)
def step():
    head_losses(h_s, w_s, h_t, w_t, labels, cfg)[0].backward()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))  # the steady state: after two steps of warm-up the heap may still grow now and then
"""


@functools.cache
def page_faults(*args: str) -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FAULTS, *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_on_a_cpu_freed_memory_stays_in_the_process():
    """keep_freed_cpu_memory (the trainer and the evaluation call it on a CPU): a head-loss step
    over 64 MiB logit chunks takes a handful of page faults, where glibc's defaults map, fault in
    and unmap every chunk's temporaries again (~0.5 M faults per step measured)."""
    assert page_faults("glibc", "1048") > 50_000  # the trap: one 64 MiB chunk of logits per temporary
    assert page_faults("keep", "1048") < 5_000


def test_cpu_chunks_stay_below_the_mmap_threshold():
    from lrc_dist.losses import chunk_tokens

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_tokens(LossConfig(), 32000, cpu) * 32000 * 4 <= 16 << 20  # fp32 bytes of one logits chunk
    assert chunk_tokens(LossConfig(), 32000, cuda) * 32000 * 4 >= 64 << 20  # large matmuls where blocks are cached
    assert chunk_tokens(LossConfig(chunk_tokens=7), 32000, cpu) == 7
    # a real vocabulary (Gemma-3's 262,144): chunks of 16 tokens would run the matmuls at memory speed
    assert chunk_tokens(LossConfig(), 262144, cpu) == chunk_tokens(LossConfig(), 262144, cuda) == 128

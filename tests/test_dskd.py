"""Dual-space KD (lrc_dist.dskd) against a direct, unchunked float64 reference written from the method (docs/METHOD.md)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_curve, rel_err
from export_reference import assert_export_as_from_disk
from lrc_dist.dskd import DualSpaceProjector, dskd_losses
from lrc_dist.divergences import DIVERGENCES, GRADIENTS
from lrc_dist.losses import LossConfig
from test_losses import direct_divergence

TERMS = ["dskd", "dskd/kd_stu", "dskd/ce_t2s", "dskd/kd_tea", "dskd/agree"]


def direct(h_s, w_s, h_t, w_t, valid, t2s, cfg, normalizer=None):
    """The DSKD terms from their formulas, with the paper's matrices (W = w.T) and an explicit pinv."""
    T, D = cfg.dskd_temperature, cfg.dskd_divergence
    W_s, W_t = w_s.T, w_t.T  # d x V
    valid = valid.double()
    n = valid.sum() if normalizer is None else normalizer
    z_t = h_t @ W_t
    t_pred = z_t.argmax(-1)
    z_t2s = (h_t @ t2s) @ W_s.detach()
    z_s = h_s @ W_s
    ce_t2s = F.cross_entropy(z_t2s, t_pred, reduction="none")
    agree = (z_t2s.argmax(-1) == t_pred).double()
    kd_stu = direct_divergence(D, torch.softmax(z_t2s.detach() / T, -1), torch.softmax(z_s / T, -1), cfg.skew)
    if cfg.dskd_mask:
        kd_stu = kd_stu * agree
    W_s2t = W_s @ torch.linalg.pinv(W_t)
    z_s2t = (h_s @ W_s2t) @ W_t
    kd_tea = direct_divergence(D, torch.softmax(z_t / T, -1), torch.softmax(z_s2t / T, -1), cfg.skew)
    out = {"dskd/kd_stu": (kd_stu * valid).sum() / n, "dskd/ce_t2s": (ce_t2s * valid).sum() / n,
           "dskd/kd_tea": (kd_tea * valid).sum() / n, "dskd/agree": (agree * valid).sum() / n}
    out["dskd"] = out["dskd/kd_stu"] + out["dskd/ce_t2s"] + out["dskd/kd_tea"]
    return out


def inputs(n=23, d_s=6, d_t=10, vocab=40, seed=0, dtype=torch.float64):
    """Random states and heads, the teacher's head partly in the span of the student's, and the
    projector at its ideal init: the projection keeps the teacher's argmax on some tokens only, so
    that the agreement mask matters."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d_s, generator=g, dtype=dtype, requires_grad=True)
    w_s = torch.randn(vocab, d_s, generator=g, dtype=dtype, requires_grad=True)
    # the teacher too requires grad, to prove that DSKD gives it none
    h_t = torch.randn(n, d_t, generator=g, dtype=dtype, requires_grad=True)
    w_t = w_s.detach() @ torch.randn(d_s, d_t, generator=g, dtype=dtype)
    w_t = (w_t + torch.randn(vocab, d_t, generator=g, dtype=dtype)).requires_grad_(True)
    valid = torch.rand(n, generator=g) > 0.25
    projector = DualSpaceProjector(d_t, d_s).to(dtype).ideal_init_(w_t, w_s)
    return h_s, w_s, h_t, w_t, valid, projector


@pytest.mark.parametrize("chunk", [1, 5, 23, None])
@pytest.mark.parametrize("divergence", ["forward_kl", "js", "skewed_reverse_kl"])
@pytest.mark.parametrize("mask", [True, False])
def test_values_and_grads_match_direct_formulas(chunk, divergence, mask):
    cfg = LossConfig(dskd_weight=1.7, dskd_temperature=2.0, dskd_divergence=divergence, dskd_mask=mask,
                     skew=0.2, chunk_tokens=chunk)
    h_s, w_s, h_t, w_t, valid, projector = inputs()
    loss, metrics = dskd_losses(h_s, w_s, h_t, w_t, valid, projector, cfg)
    ref = direct(h_s, w_s, h_t, w_t, valid, projector.t2s, cfg)
    assert 0.2 < ref["dskd/agree"] < 0.9  # the mask bites
    for name in TERMS:  # the loss math is fp32 by design, the reference float64
        assert metrics[name].item() == pytest.approx(ref[name].item(), rel=1e-5), name
        assert not metrics[name].requires_grad
    assert loss.item() == pytest.approx(1.7 * ref["dskd"].item(), rel=1e-5)

    trained = (h_s, w_s, projector.t2s)
    grads = torch.autograd.grad(3.0 * loss, trained, retain_graph=True)  # a non-unit upstream gradient
    ref_grads = torch.autograd.grad(3.0 * 1.7 * ref["dskd"], trained, retain_graph=True)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5
    # the projector learns from L_ce_t2s alone
    (ref_t2s_grad,) = torch.autograd.grad(3.0 * 1.7 * ref["dskd/ce_t2s"], projector.t2s)
    assert rel_err(grads[2], ref_t2s_grad) < 1e-5
    # the teacher learns nothing
    loss.backward()
    assert h_t.grad is None and w_t.grad is None


def test_student_and_teacher_space_terms_train_the_student():
    """Each KD term alone has a gradient for the student's state and head (kd_tea through s2t)."""
    h_s, w_s, h_t, w_t, valid, projector = inputs()
    cfg = LossConfig(dskd_weight=1.0, dskd_mask=False)
    ref = direct(h_s, w_s, h_t, w_t, valid, projector.t2s, cfg)
    for term in ("dskd/kd_stu", "dskd/kd_tea"):
        grad_h, grad_w, grad_t2s = torch.autograd.grad(ref[term], (h_s, w_s, projector.t2s), allow_unused=True,
                                                     retain_graph=True)
        assert grad_h.norm() > 0 and grad_w.norm() > 0 and grad_t2s is None
    loss, _ = dskd_losses(h_s, w_s, h_t, w_t, valid, projector, cfg)
    grad_w = torch.autograd.grad(loss, w_s)[0]
    assert rel_err(grad_w, torch.autograd.grad(ref["dskd"], w_s)[0]) < 1e-5


def test_normalizer_and_float_mask():
    h_s, w_s, h_t, w_t, valid, projector = inputs()
    cfg = LossConfig(dskd_weight=0.5, chunk_tokens=4)
    loss, metrics = dskd_losses(h_s, w_s, h_t, w_t, valid.double(), projector, cfg, normalizer=100)
    ref = direct(h_s, w_s, h_t, w_t, valid, projector.t2s, cfg, normalizer=100)
    for name in TERMS:
        assert metrics[name].item() == pytest.approx(ref[name].item(), rel=1e-5), name
    assert loss.item() == pytest.approx(0.5 * ref["dskd"].item(), rel=1e-5)


def test_no_gradients_under_no_grad():
    h_s, w_s, h_t, w_t, valid, projector = inputs()
    cfg = LossConfig(dskd_weight=1.0)
    with torch.no_grad():
        loss, metrics = dskd_losses(h_s, w_s, h_t, w_t, valid, projector, cfg)
    assert not loss.requires_grad
    assert metrics["dskd"].item() == pytest.approx(dskd_losses(h_s, w_s, h_t, w_t, valid, projector, cfg)[0].item())


def test_config_errors():
    h_s, w_s, h_t, w_t, valid, projector = inputs()
    with pytest.raises(ValueError, match="loss.dskd_divergence='kl2'"):
        dskd_losses(h_s, w_s, h_t, w_t, valid, projector, LossConfig(dskd_divergence="kl2"))
    with pytest.raises(ValueError, match="one vocabulary"):
        dskd_losses(h_s, w_s, h_t, w_t[:-1], valid, projector, LossConfig())


# ---- the projections --------------------------------------------------------------------------


def test_ideal_init_reproduces_teacher_logits_when_vocab_fits():
    h_s, w_s, h_t, w_t, _, _ = inputs(d_s=8, vocab=6)  # V <= d_S: the student head spans all logits
    projector = DualSpaceProjector(10, 8).double().ideal_init_(w_t, w_s)
    assert rel_err(h_t @ projector.t2s @ w_s.T, h_t @ w_t.T) < 1e-10


def test_ideal_init_is_least_squares_when_vocab_is_larger():
    _, w_s, _, w_t, _, _ = inputs(d_s=6, vocab=40)
    projector = DualSpaceProjector(10, 6).double().ideal_init_(w_t, w_s)
    # t2s minimises || w_s t2s^T - w_t ||, the fit of the teacher head by the student's
    lstsq = torch.linalg.lstsq(w_s.detach(), w_t.detach()).solution.T
    assert rel_err(projector.t2s, lstsq) < 1e-10


@pytest.mark.parametrize("vocab", [6, 40])  # teacher head of full row rank, of full column rank
def test_s2t_is_student_head_times_pinv_of_teacher_head(vocab):
    _, w_s, _, w_t, _, projector = inputs(vocab=vocab)
    s2t = projector.s2t(w_s, w_t)
    assert s2t.dtype == torch.float32 and s2t.shape == (6, 10)
    assert rel_err(s2t, (w_s.T @ torch.linalg.pinv(w_t.T)).float()) < 1e-5
    assert list(projector.state_dict()) == ["t2s"]  # the cached pinv is recomputed, never saved
    projector.to(torch.bfloat16)  # a cast cache is no use: recomputed in fp32
    assert rel_err(projector.s2t(w_s, w_t), s2t) < 1e-6 and projector.teacher_gram_pinv.dtype == torch.float32


def test_s2t_of_an_lrc_student_head_is_its_projection():
    """In LRC the student head is w_t @ P [V, d_S]: s2t maps student states back by P^T exactly."""
    _, _, _, w_t, _, projector = inputs(vocab=40)
    proj = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(projector.s2t(w_t @ proj, w_t), proj.T.float()) < 1e-5


# ---- training ---------------------------------------------------------------------------------


def test_adam_steps_lower_the_dskd_loss():
    h_s, w_s, h_t, w_t, valid, projector = inputs(dtype=torch.float32, seed=3)
    h_s, w_s = torch.nn.Parameter(h_s.detach()), torch.nn.Parameter(w_s.detach())
    h_t, w_t = h_t.detach(), w_t.detach()
    opt = torch.optim.Adam([h_s, w_s, *projector.parameters()], lr=0.05)
    cfg = LossConfig(dskd_weight=1.0, chunk_tokens=8)
    history = []
    for _ in range(40):
        loss, metrics = dskd_losses(h_s, w_s, h_t, w_t, valid, projector, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    first, last = history[0], history[-1]
    assert last["dskd"] < 0.5 * first["dskd"]
    assert last["dskd/kd_tea"] < first["dskd/kd_tea"] and last["dskd/ce_t2s"] < first["dskd/ce_t2s"]
    assert last["dskd/agree"] >= first["dskd/agree"]


def test_bf16_inputs_give_finite_fp32_losses(monkeypatch):
    h_s, w_s, h_t, w_t, valid, projector = inputs(dtype=torch.float32, n=64, vocab=300)
    seen = set()

    def spy(logq, logp):
        seen.update((logq.dtype, logp.dtype))
        return GRADIENTS["forward_kl"](logq, logp)

    monkeypatch.setitem(DIVERGENCES, "spy", DIVERGENCES["forward_kl"])
    monkeypatch.setitem(GRADIENTS, "spy", spy)
    cfg = LossConfig(dskd_weight=1.0, chunk_tokens=16, dskd_divergence="spy")
    # large hidden states: logits of several hundreds, whose softmax overflows in half precision
    low = [(10 * t).detach().bfloat16().requires_grad_(True) for t in (h_s, w_s)]
    teacher = [(10 * t).detach().bfloat16() for t in (h_t, w_t)]
    loss, metrics = dskd_losses(*low, *teacher, valid, projector, cfg)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in low)
    assert seen == {torch.float32} and loss.dtype == torch.float32  # the loss math is fp32
    assert torch.isfinite(projector.t2s.grad).all()
    ref_loss, _ = dskd_losses(*(t.detach().float() for t in low), *(t.float() for t in teacher), valid, projector,
                              cfg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=0.05)


# ---- DSKD as the objective of training runs: LRC and ordinary students -------------------------


def _model(tmp_path, method: str):
    """An LRC model, or a KD pair, of width 32 over a tiny qwen2 teacher."""
    from conftest import build_checkpoint
    from lrc_dist.kd import KnowledgeDistillation, student_like
    from lrc_dist.lrc import LowRankClone, LRCConfig
    from lrc_dist.model import CausalLM

    teacher = CausalLM.from_pretrained(build_checkpoint(tmp_path / "t", "qwen2"))
    if method == "kd":
        return KnowledgeDistillation(student_like(teacher, 32, seed=0), teacher)
    lrc = LowRankClone(teacher, LRCConfig(student_hidden_size=32))
    lrc.init_weights(0)
    return lrc


@pytest.mark.parametrize("method", ["lrc", "kd"])
def test_models_add_the_dual_space_objective(tmp_path, method):
    """loss(dskd_weight=w) = loss(dskd_weight=0) + w * dskd_losses on the same hidden states; the
    projector starts at the ideal init and learns; save_lrc leaves it out of the student."""
    model = _model(tmp_path, method)
    model.enable_dual_space()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    cfg = LossConfig(dskd_weight=0.5, kl_weight=0.3, temperature=2.0)
    total, metrics = model(ids, labels, cfg)
    base, _ = model(ids, labels, LossConfig(dskd_weight=0.0, kl_weight=0.3, temperature=2.0))
    if method == "lrc":
        out = model.lockstep(ids)
        h_s, h_t, w_s, w_t = out.student_hidden, out.teacher_hidden, model.student_head_weight(), model.teacher_head_weight()
    else:
        h_s, h_t = model.student_hidden(ids), model.teacher.hidden_states(ids)
        w_s, w_t = model.student.lm_head_weight, model.teacher.lm_head_weight
    want, want_metrics = dskd_losses(h_s.flatten(0, 1), w_s, h_t.flatten(0, 1), w_t, torch.ones(24, dtype=torch.bool),
                                     model.dual_space, cfg)
    assert total.item() == pytest.approx((base + want).item(), rel=1e-5)
    assert metrics["dskd/kd_tea"].item() == pytest.approx(want_metrics["dskd/kd_tea"].item(), rel=1e-5)
    ideal = DualSpaceProjector(w_t.shape[1], w_s.shape[1]).ideal_init_(w_t, w_s.detach())
    assert rel_err(model.dual_space.t2s.detach(), ideal.t2s.detach()) < 1e-6
    total.backward()
    assert model.dual_space.t2s.grad.abs().sum() > 0
    if method == "lrc":
        from lrc_dist.build import load_lrc
        from lrc_dist.lrc_files import save_lrc

        save_lrc(model, tmp_path / "saved", tmp_path / "t")
        assert not any("dual_space" in k for k in load_lrc(tmp_path / "saved").trainable_state_dict())


def test_dskd_needs_its_projector(tmp_path):
    model = _model(tmp_path, "kd")
    with pytest.raises(ValueError, match="dskd_weight"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), LossConfig(dskd_weight=1.0))


DSKD_RUN = ("--loss.dskd_weight=0.5", "--loss.kl_weight=0", "--loss.lm_weight=0.5")
DSKD_KEYS = ("loss", "lm", "dskd", "dskd/kd_stu", "dskd/ce_t2s", "dskd/kd_tea", "dskd/agree", "grad_norm")


@pytest.fixture(scope="module")
def dskd_reference(tiny_job, tmp_path_factory):
    from test_train import run

    return run(tiny_job, tmp_path_factory.mktemp("dskd"), 1, "--parallel.backend=none", *DSKD_RUN)


@pytest.mark.parametrize("backend", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.slow)])  # ZeRO: 75 s
def test_dskd_runs_match_one_process_on_both_backends(dskd_reference, tiny_job, tmp_path, backend):
    """LRC with DSKD instead of the KL term (the paper's 0.5 CE + 0.5 L_kd): 2 ranks of FSDP2 or
    ZeRO-3 give the single-process curve, every DSKD term included, and the student exports."""
    from test_train import run

    first, last = dskd_reference[0], dskd_reference[-1]
    assert last["loss"] < first["loss"] and last["dskd/kd_tea"] < first["dskd/kd_tea"] and "kl" not in first
    records = run(tiny_job, tmp_path, 2, f"--parallel.backend={backend}", *DSKD_RUN)
    assert_same_curve(records, dskd_reference, DSKD_KEYS, abs=1e-7)
    assert_export_as_from_disk(tmp_path, 6, tmp_path / "scratch")  # the projector is no part of lrc/

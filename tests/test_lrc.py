"""The LRC model: identity clone, which parameters learn, loss goes down, options, errors."""

import pytest
import torch

from conftest import build_checkpoint, rel_err
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LowRankClone, LRCConfig, lrc_loss
from lrc_dist.lrc_config import CLONE_TERMS
from lrc_dist.model import CausalLM, get_parameter

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def identity_clone(path, **cfg) -> tuple[LowRankClone, CausalLM]:
    """d_S = d_T, every P = I and student norms = teacher norms: the student is the teacher."""
    teacher = CausalLM.from_pretrained(path)
    model = LowRankClone(CausalLM.from_pretrained(path), LRCConfig(teacher.args.hidden_size, **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("norm.weight"):
                p.copy_(torch.eye(p.shape[0]))
        for block in model.layers:
            for hf in block.norm_names.values():  # two norms per layer, four in Gemma-3
                get_parameter(block, hf).copy_(get_parameter(block.teacher, hf))
        model.norm.weight.copy_(model.teacher_norm.weight)
    return model, teacher


@pytest.mark.parametrize("variant", [{}, {"shared_attn_proj": True, "shared_ffn_proj": True}, {"attn_out_space": "teacher"}])
def test_identity_projection_reproduces_teacher(checkpoint, variant):
    model, teacher = identity_clone(checkpoint, **variant)
    with torch.no_grad():
        out = model.lockstep(IDS)
        student_logits = out.student_hidden @ model.student_head_weight().T
        assert rel_err(student_logits, teacher(IDS)) < 1e-6
        assert rel_err(out.student_hidden, out.teacher_hidden) < 1e-6
    assert set(out.clone) == set(CLONE_TERMS)
    assert all(v.item() < 1e-10 for v in out.clone.values())


def test_only_projections_and_student_norms_learn(checkpoint):
    model = LowRankClone.from_teacher(checkpoint, LRCConfig(32))
    total, _ = model(IDS, IDS, LossConfig())
    total.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert "proj" in name or name.endswith("norm.weight") and "teacher" not in name, name
        else:
            assert p.grad is None, name
    n_layers, tied = model.teacher_args.num_layers, model.teacher_args.tie_word_embeddings
    n_proj = sum(1 for n in trainable if "proj" in n)
    assert n_proj == 7 * n_layers + 1 + (not tied)
    norms = 4 if model.teacher_args.model_type == "gemma3_text" else 2  # per layer; and the final one
    assert len(trainable) - n_proj == norms * n_layers + 1


def test_teacher_activations_are_not_in_the_graph(tmp_path):
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "m", "qwen2"), LRCConfig(32))
    out = model.lockstep(IDS)
    assert not out.teacher_hidden.requires_grad and out.student_hidden.requires_grad


@pytest.mark.parametrize("term,divergence", [("loss", "forward_kl"), ("kl", "forward_kl"), ("clone", "forward_kl"),
                                             ("kl", "js"), ("kl", "adaptive_kl")])
def test_a_few_steps_lower_the_loss(tmp_path, term, divergence):
    """AdamW on the full objective lowers it; on the logit divergence (or clone) alone, lowers that term."""
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "m", "llama3"), LRCConfig(32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    only = {"kl": dict(lm_weight=0.0, clone_weight=0.0), "clone": dict(lm_weight=0.0, kl_weight=0.0)}
    cfg = LossConfig(temperature=2.0, divergence=divergence, **only.get(term, {}))
    history = []
    for _ in range(15):
        total, metrics = model(IDS, IDS, cfg)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(metrics[term].item())
    assert history[-1] < 0.8 * history[0], history


def test_clone_term_selection_and_weights(tmp_path):
    path = build_checkpoint(tmp_path / "m", "qwen3")
    model = LowRankClone.from_teacher(path, LRCConfig(32, clone_terms=("gate", "ffn_out")))
    out = model.lockstep(IDS)
    assert set(out.clone) == {"gate", "ffn_out"}
    model.cfg.clone_term_weights = {"gate": 0.0}
    _, metrics = lrc_loss(model, out, IDS, LossConfig())
    assert torch.allclose(metrics["clone"], out.clone["ffn_out"].detach())


def test_io_variants_share_projections(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama2")
    model = LowRankClone.from_teacher(path, LRCConfig(32, shared_attn_proj=True, shared_ffn_proj=True))
    assert sorted(model.layers[0].proj) == ["attn_in", "down", "ffn_in", "o"]


def test_bad_options(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama2")
    with pytest.raises(ValueError, match="student_hidden_size=65 must be in 1..64"):
        LowRankClone.from_teacher(path, LRCConfig(65))
    with pytest.raises(ValueError, match="unknown"):
        LRCConfig(32, clone_terms=("q", "attn"))
    with pytest.raises(ValueError, match="attn_out_space"):
        LRCConfig(32, attn_out_space="both")


def test_bf16_teacher_with_fp32_master_projections(tmp_path):
    path = build_checkpoint(tmp_path / "m", "qwen2")
    ref = LowRankClone.from_teacher(path, LRCConfig(32))
    model = LowRankClone.from_teacher(path, LRCConfig(32), dtype=torch.bfloat16)
    total, metrics = lrc_loss(model, out := model.lockstep(IDS), IDS, LossConfig())
    ref_total, _ = ref(IDS, IDS, LossConfig())
    total.backward()
    assert out.student_hidden.dtype == torch.bfloat16
    assert abs(total.item() - ref_total.item()) < 2e-2 * ref_total.item()
    for name, p in model.named_parameters():
        assert (p.dtype, p.grad is not None and p.grad.dtype) == (
            (torch.float32, torch.float32) if p.requires_grad else (torch.bfloat16, False)
        ), name
    assert all(v.dtype == torch.bfloat16 for v in model.student_state_dict().values())


def test_activation_checkpointing_same_grads_teacher_run_once(tmp_path):
    path = build_checkpoint(tmp_path / "m", "qwen3")
    grads, teacher_calls = [], []
    for ac in (False, True):
        model = LowRankClone.from_teacher(path, LRCConfig(32))
        calls = []
        for block in model.layers:
            block.activation_checkpointing = ac
            block.teacher.register_forward_hook(lambda *_: calls.append(1))
        total, _ = model(IDS, IDS, LossConfig())
        total.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        teacher_calls.append(len(calls))
    assert teacher_calls == [2, 2]  # once per layer, also when the student is recomputed
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


def test_micro_batches_give_the_full_batch_gradient_with_ignored_labels(tmp_path):
    """Clone terms count only labelled positions, like LM and KL: two micro-batches of unequal
    labelled counts, each weighted by its share, give the full batch's loss and gradient."""
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "t", "qwen2"), LRCConfig(32), seed=1)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    labels = ids.roll(-1, 1)
    labels[0, :12] = labels[1, :3] = labels[3, 5:] = -100  # uneven, as SFT masks are
    cfg = LossConfig(temperature=2.0)

    def grads(batches):
        model.zero_grad()
        normalizer = int((labels != -100).sum())
        total = sum(model(ids[b], labels[b], cfg, normalizer)[0] for b in batches)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full, micro = grads([slice(0, 4)]), grads([slice(0, 1), slice(1, 4)])
    assert micro[0] == pytest.approx(full[0].item(), rel=1e-6)
    assert max(rel_err(m, f) for m, f in zip(micro[1], full[1])) < 1e-5


def test_a_different_teacher_is_caught(tmp_path):
    from lrc_dist.build import load_lrc
    from lrc_dist.lrc_files import save_lrc
    from lrc_dist.model import CheckpointError

    teacher = build_checkpoint(tmp_path / "teacher", "qwen2")
    model = LowRankClone.from_teacher(teacher, LRCConfig(32))
    save_lrc(model, tmp_path / "lrc", teacher)
    other = build_checkpoint(tmp_path / "other", "qwen2", seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match=r"trained with another teacher than the one in .*other"):
        load_lrc(tmp_path / "lrc", teacher_path=other)
    load_lrc(tmp_path / "lrc", teacher_path=teacher)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("valid", ["all", "mask", "none_valid"])
def test_clone_mse_matches_its_formula(dtype, valid):
    """masked_mse's closed-form autograd Function: the value and both inputs' gradients of
    mean over valid positions of mean over features of (a - b)^2, computed in fp32."""
    from lrc_dist.lrc import masked_mse

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 7, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(2, 5, 7, generator=g).to(dtype).requires_grad_(True)  # a target through P: it trains too
    mask = {"all": None, "mask": torch.rand(2, 5, generator=g) > 0.4, "none_valid": torch.zeros(2, 5, dtype=torch.bool)}[valid]
    per_position = (a.float() - b.float()).pow(2).mean(-1)
    m = torch.ones(2, 5) if mask is None else mask.float()
    want = (per_position * m).sum() / m.sum().clamp(min=1)
    got = masked_mse(a, b, mask)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    grads, want_grads = torch.autograd.grad(3 * got, (a, b)), torch.autograd.grad(3 * want, (a, b))
    for x, y in zip(grads, want_grads):
        assert x.dtype == dtype and torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0 or valid == "none_valid"


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # untied head; tied head with a scaled embedding
def test_projected_head_gives_the_generated_heads_loss_and_gradients(tmp_path, family):
    """lrc.head_logits=project reads h_S P^T through the teacher's head instead of generating
    W_T P: the same logits, so the same loss and gradients, up to rounding."""
    path = build_checkpoint(tmp_path / "m", family)
    results = []
    for head in ("generate", "project"):
        model = LowRankClone.from_teacher(path, LRCConfig(32, head_logits=head), seed=2)
        assert model.projects_head(IDS.numel()) == (head == "project")
        total, metrics = model(IDS, IDS, LossConfig(temperature=2.0))
        total.backward()
        results.append((metrics, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (m_gen, g_gen), (m_proj, g_proj) = results
    for key in ("loss", "lm", "kl", "clone"):
        assert m_proj[key].item() == pytest.approx(m_gen[key].item(), rel=1e-6), key
    assert set(g_proj) == set(g_gen)
    assert max(rel_err(g_proj[n], g_gen[n]) for n in g_gen) < 1e-5


def test_head_logits_auto_takes_the_cheaper_head(tmp_path):
    """auto projects while generating the vocabulary-sized head would cost more FLOPs than reading
    the teacher's head at width d_T (metrics.head_flops_per_token), and generates beyond that."""
    from lrc_dist.metrics import head_flops_per_token

    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "m", "qwen2"), LRCConfig(16))  # 256 x 64 head
    v, d_t, d_s = 256, 64, 16
    # project: 4 V d_T + 6 d_T d_S per token; generate: 6 V d_S + 4 V d_T d_S / N, equal at N = 4 d_T d_S / (4 d_T - 6 d_S)
    crossover = 4 * d_t * d_s / (4 * d_t - 6 * d_s + 6 * d_t * d_s / v)
    below, above = int(crossover), int(crossover) + 1
    assert head_flops_per_token(v, d_t, d_s, below, True) < head_flops_per_token(v, d_t, d_s, below, False)
    assert head_flops_per_token(v, d_t, d_s, above, True) > head_flops_per_token(v, d_t, d_s, above, False)
    assert model.projects_head(below) and not model.projects_head(above)
    model.generation_ranks = 2  # a sharded generation costs each rank half: generating wins sooner
    assert not model.projects_head(below)
    with pytest.raises(ValueError, match="head_logits"):
        LRCConfig(16, head_logits="teacher")

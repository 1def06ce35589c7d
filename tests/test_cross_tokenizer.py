"""KD from a teacher with another tokenizer (model.method kd, a student dir with its own
tokenizer.json): the KD terms equal formulas written on both models' full logits at the aligned
positions, over the shared vocabulary; the trainer gives one curve on every backend."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from conftest import assert_same_curve, build_checkpoint, build_tokenizer, rel_err, write_corpus
from lrc_dist.align import TeacherRetokenizer
from lrc_dist.config import load_config
from lrc_dist.dskd import DualSpaceProjector, dskd_losses
from lrc_dist.losses import LossConfig
from lrc_dist.pretokenize import tokenize_corpus
from lrc_dist.train import build_batches, build_model
from test_train import run

STUDENT = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8)


@pytest.fixture(scope="module")
def cross_job(tiny_job, tmp_path_factory):
    """(teacher dir, student dir, token set): the tiny job's teacher (BPE of 300 tokens) and a
    student whose byte-level BPE has 320 tokens, learnt from other text, its ids shifted by a
    leading <|pad|>: the vocabularies share most tokens but under other ids. The token set is the
    teacher's corpus in the student's tokens."""
    teacher, _ = tiny_job
    root = tmp_path_factory.mktemp("cross")
    write_corpus(root / "student_corpus.jsonl", seed=1)
    student = build_checkpoint(root / "student", "qwen2", seed=1, **STUDENT)
    build_tokenizer(student, root / "student_corpus.jsonl", 320, special_tokens=("<|pad|>", "<|endoftext|>"))
    tokenize_corpus(str(Path(teacher).parent / "corpus.jsonl"), student, str(root / "tokens"), workers=1,
                    progress=False)
    return teacher, student, str(root / "tokens")


def job_cfg(cross_job, **overrides):
    teacher, student, tokens = cross_job
    return load_config(None, {"model.method": "kd", "model.teacher": teacher, "model.student": student,
                              "data.paths": [tokens], "data.seq_len": 32, "micro_batch_size": 4,
                              "global_batch_size": 4, "steps": 1, **overrides})


def shared_vocabulary(teacher_dir, student_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ids, student ids) of the token strings both vocabularies hold, by student id: for
    two byte-level BPEs (one alphabet, one EOS string, no other shared special token) identical
    strings are identical bytes, and EOS pairs with EOS."""
    teacher = json.loads((Path(teacher_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    student = json.loads((Path(student_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    pairs = sorted((j, teacher[token]) for token, j in student.items() if token in teacher)
    return torch.tensor([t for _, t in pairs]), torch.tensor([s for s, _ in pairs])


def aligned_logits(model, batch):
    """Both models' full logits at every aligned pair, [N, V_S] and [N, V_T], and the pairs."""
    student_logits = model.student(batch["input_ids"])
    with torch.no_grad():
        teacher_logits = model.teacher(batch["teacher_input_ids"])
    b, k = batch["align_mask"].nonzero(as_tuple=True)
    j, i = batch["align_student"][b, k], batch["align_teacher"][b, k]
    return student_logits, student_logits[b, j], teacher_logits[b, i], (b, j, i)


def test_kl_is_the_aligned_restricted_kl_of_both_models(cross_job):
    teacher_dir, student_dir, _ = cross_job
    cfg = job_cfg(cross_job)
    assert cfg.model.cross_tokenizer()
    model = build_model(cfg, dtype=torch.float32)
    batch = next(build_batches(cfg, 320, 0, 1, 0, model.cross_tokenizer))
    t_ids, s_ids = shared_vocabulary(teacher_dir, student_dir)
    assert torch.equal(model.teacher_vocab, t_ids) and torch.equal(model.student_vocab, s_ids)
    assert 200 < len(s_ids) < 300 and (t_ids != s_ids).float().mean() > 0.9  # a true subset, other ids
    assert "teacher_vocab" not in model.state_dict()  # derived from the tokenizers, never checkpointed

    # the pairs have read the same text and predict the same token
    student_tok = Tokenizer.from_file(str(Path(student_dir) / "tokenizer.json"))
    teacher_tok = Tokenizer.from_file(str(Path(teacher_dir) / "tokenizer.json"))
    student_logits, z_s, z_t, (b, j, i) = aligned_logits(model, batch)
    teacher_labels = TeacherRetokenizer(student_dir, teacher_dir, max_len=64)(
        torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1))["teacher_labels"]
    for row, s, t in zip(b.tolist(), j.tolist(), i.tolist()):
        read_s = student_tok.decode(batch["input_ids"][row, : s + 1].tolist(), skip_special_tokens=False)
        read_t = teacher_tok.decode(batch["teacher_input_ids"][row, : t + 1].tolist(), skip_special_tokens=False)
        assert read_s == read_t
        next_s = student_tok.id_to_token(batch["labels"][row, s].item())
        assert next_s == teacher_tok.id_to_token(teacher_labels[row, t].item())
    ratio = batch["align_mask"].sum().item() / batch["labels"].numel()
    assert 0.2 < ratio < 0.95  # real alignments, and tokens that do not align

    T = 2.0
    loss_cfg = LossConfig(kl_weight=0.7, temperature=T, chunk_tokens=7)
    loss, metrics = model(**batch, loss_cfg=loss_cfg)
    logp = torch.log_softmax(z_t[:, t_ids] / T, -1)
    logq = torch.log_softmax(z_s[:, s_ids] / T, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    ce = F.cross_entropy(student_logits.flatten(0, 1), batch["labels"].flatten())  # own tokens, full head
    assert metrics["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert metrics["lm"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + 0.7 * kl).item(), rel=1e-5)
    assert metrics["aligned_ratio"].item() == pytest.approx(ratio)
    with pytest.raises(ValueError, match="teacher_input_ids"):
        model(batch["input_ids"], batch["labels"], loss_cfg)

    # The gradient reaches the student's head through the restriction; a global normalizer of the
    # aligned pairs divides the KD term only.
    head = model.student.lm_head_weight
    kd_only, _ = model(**batch, loss_cfg=LossConfig(lm_weight=0.0, temperature=T), aligned_normalizer=3 * len(b))
    (got,) = torch.autograd.grad(kd_only, head)
    (want,) = torch.autograd.grad(kl / 3, head)
    assert rel_err(got, want) < 1e-5 and got.abs().sum() > 0
    assert model.teacher.lm_head_weight.grad is None


def test_dskd_on_the_aligned_pairs_and_shared_heads(cross_job):
    cfg = job_cfg(cross_job, **{"loss.dskd_weight": 0.5, "loss.kl_weight": 0.0})
    model = build_model(cfg, dtype=torch.float32)
    batch = next(build_batches(cfg, 320, 0, 1, 0, model.cross_tokenizer))
    w_s, w_t = model.student.lm_head_weight[model.student_vocab], model.teacher.lm_head_weight[model.teacher_vocab]
    ideal = DualSpaceProjector(w_t.shape[1], w_s.shape[1]).ideal_init_(w_t, w_s.detach())
    assert rel_err(model.dual_space.t2s.detach(), ideal.t2s.detach()) < 1e-6  # from the restricted heads

    total, metrics = model(**batch, loss_cfg=cfg.loss)
    h_s, h_t = model.student_hidden(batch["input_ids"]), model.teacher.hidden_states(batch["teacher_input_ids"])
    b, k = batch["align_mask"].nonzero(as_tuple=True)
    rows_s, rows_t = h_s[b, batch["align_student"][b, k]], h_t[b, batch["align_teacher"][b, k]]
    want, want_metrics = dskd_losses(rows_s, w_s, rows_t, w_t, torch.ones(len(b)), model.dual_space, cfg.loss)
    for name in ("dskd", "dskd/kd_stu", "dskd/ce_t2s", "dskd/kd_tea", "dskd/agree"):
        assert metrics[name].item() == pytest.approx(want_metrics[name].item(), rel=1e-5), name
    assert total.item() == pytest.approx(metrics["lm"].item() + want.item(), rel=1e-5) and metrics["kl"] == 0


def test_same_tokenizer_is_no_cross_tokenizer_run(cross_job, tmp_path):
    """A student dir holding the teacher's tokenizer: ordinary KD, so a vocabulary of another size
    is still the clear error."""
    teacher, student, _ = cross_job
    shutil.copytree(student, tmp_path / "s")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(teacher) / name, tmp_path / "s" / name)
    cfg = job_cfg(cross_job, **{"model.student": str(tmp_path / "s")})
    assert not cfg.model.cross_tokenizer()
    with pytest.raises(ValueError, match="vocabulary"):
        build_model(cfg, dtype=torch.float32)


# ---- the trainer ---------------------------------------------------------------------------------

CROSS_KEYS = ("loss", "lm", "kl", "aligned_ratio", "grad_norm")


def cross_run(cross_job, run_dir, nproc, *overrides):
    teacher, student, tokens = cross_job
    return run((teacher, tokens), run_dir, nproc, "--model.method=kd", f"--model.student={student}", *overrides)


@pytest.fixture(scope="module")
def cross_reference(cross_job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cross_reference")
    return cross_run(cross_job, run_dir, 1, "--parallel.backend=none"), run_dir


def test_reference_run_learns_and_exports_the_students_tokenizer(cross_job, cross_reference):
    records, run_dir = cross_reference
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert all(r["kl"] > 0 and 0.2 < r["aligned_ratio"] <= 1 for r in records)
    exported = run_dir / "export_00000006/hf/tokenizer.json"
    assert exported.read_bytes() == (Path(cross_job[1]) / "tokenizer.json").read_bytes()


# fsdp with one sequence per micro-batch: other micro-batches than the reference's (two sequences),
# so that only the step's global aligned count gives the reference's KD mean. Both variants are slow
# (CI time): test_lrc_cross_tokenizer's FSDP run checks the same global counts through the same
# aligned head losses, and resumes.
@pytest.mark.parametrize("backend, micro_batch", [pytest.param("fsdp", 1, marks=pytest.mark.slow),
                                                  pytest.param("deepspeed", 2, marks=pytest.mark.slow)])
def test_backends_match_one_process(cross_job, cross_reference, tmp_path, backend, micro_batch):
    records = cross_run(cross_job, tmp_path, 2, f"--parallel.backend={backend}", f"--micro_batch_size={micro_batch}")
    assert_same_curve(records, cross_reference[0], CROSS_KEYS)


def test_dskd_run(cross_job, tmp_path):
    records = cross_run(cross_job, tmp_path, 1, "--parallel.backend=none", "--loss.dskd_weight=0.5",
                        "--loss.kl_weight=0")
    terms = ("dskd", "dskd/kd_stu", "dskd/ce_t2s", "dskd/kd_tea", "dskd/agree")
    assert all(torch.isfinite(torch.tensor([r[t] for t in terms])).all() for r in records)
    assert all(r["dskd"] > 0 and r["kl"] == 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]

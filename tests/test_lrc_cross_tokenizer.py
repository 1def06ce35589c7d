"""LRC from a teacher with another tokenizer (model.method lrc, model.student a dir with the
student's own tokenizer.json): the student's vocabulary rows follow lrc_dist/vocab.py's rule, the
loss equals formulas written on the materialised student and the teacher at the aligned positions,
the trainer gives one curve on every backend and across a resume, and the export is an ordinary
checkpoint with the student's vocabulary and tokenizer."""

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from conftest import assert_same_curve, build_checkpoint, rel_err
from export_reference import assert_export_as_from_disk
from lrc_dist.align import TeacherRetokenizer
from lrc_dist.build import calibration_windows, load_lrc
from lrc_dist.config import load_config
from lrc_dist.export import main as export_main
from lrc_dist.families import ModelArgs
from lrc_dist.losses import LossConfig
from lrc_dist.model import CausalLM, Context
from lrc_dist.preflight import problems
from lrc_dist.parallel import full_tensors
from lrc_dist.train import ALIGNED_KEYS, CLONE_KEYS, build_batches, build_model, on_policy_inputs, teacher_tokens, train
from lrc_dist.vocab import StudentVocab
from test_cross_tokenizer import cross_job, shared_vocabulary  # noqa: F401 (a fixture)
from test_train import run, tiny_cfg


def lrc_cfg(cross_job, **overrides):
    teacher, student, tokens = cross_job
    return load_config(None, {"model.teacher": teacher, "model.student": student, "model.dtype": "float32",
                              "model.lrc.student_hidden_size": 16, "data.paths": [tokens], "data.seq_len": 32,
                              "micro_batch_size": 4, "global_batch_size": 4, "steps": 1, **overrides})


def test_clone_positions_are_all_those_that_have_read_the_same_text(cross_job):
    teacher_dir, student_dir, _ = cross_job
    cfg = lrc_cfg(cross_job)
    batch = next(build_batches(cfg, 320, 0, 1, 0, True))
    student_tok = Tokenizer.from_file(str(Path(student_dir) / "tokenizer.json"))
    teacher_tok = Tokenizer.from_file(str(Path(teacher_dir) / "tokenizer.json"))
    for row in range(4):
        def texts(tokenizer, ids):  # the text read up to and including each position
            return [tokenizer.decode(ids[: p + 1].tolist(), skip_special_tokens=False) for p in range(len(ids))]

        s_text, t_text = texts(student_tok, batch["input_ids"][row]), texts(teacher_tok, batch["teacher_input_ids"][row])
        want = {(i, j) for i, t in enumerate(t_text) for j, s in enumerate(s_text) if s == t}
        mask = batch["clone_mask"][row]
        got = set(zip(batch["clone_teacher"][row][mask].tolist(), batch["clone_student"][row][mask].tolist()))
        assert got == want and len(got) > 8
        kd = batch["align_mask"][row]  # the KD pairs also predict the same token: a subset
        assert set(zip(batch["align_teacher"][row][kd].tolist(), batch["align_student"][row][kd].tolist())) < got


def test_student_rows_follow_the_rule(cross_job):
    teacher_dir, student_dir, _ = cross_job
    vocab = StudentVocab.load(teacher_dir, student_dir)
    t_ids, s_ids = shared_vocabulary(teacher_dir, student_dir)
    assert torch.equal(vocab.teacher_ids, t_ids) and torch.equal(vocab.student_ids, s_ids) and vocab.size == 320
    teacher_tok = Tokenizer.from_file(str(Path(teacher_dir) / "tokenizer.json"))
    student_tok = Tokenizer.from_file(str(Path(student_dir) / "tokenizer.json"))
    embedding, head = torch.randn(300, 8, dtype=torch.float64), torch.randn(300, 8, dtype=torch.float64)
    rows, head_rows = vocab.embedding_rows(embedding), vocab.head_rows(head)
    shared = dict(zip(s_ids.tolist(), t_ids.tolist()))
    pad = student_tok.token_to_id("<|pad|>")
    checked = 0
    for j in range(320):
        if j in shared:
            assert torch.equal(rows[j], embedding[shared[j]]) and torch.equal(head_rows[j], head[shared[j]])
        elif j == pad:  # a special token the teacher lacks: the mean of its ordinary rows (not its EOS)
            ordinary = [i for i in range(300) if i != teacher_tok.token_to_id("<|endoftext|>")]
            assert torch.allclose(rows[j], embedding[ordinary].mean(0)) and torch.allclose(head_rows[j], head[ordinary].mean(0))
        else:  # the teacher's tokens of its text
            spelling = teacher_tok.encode(student_tok.decode([j]), add_special_tokens=False).ids
            assert len(spelling) > 1
            assert torch.allclose(rows[j], embedding[spelling].mean(0)) and torch.equal(head_rows[j], head[spelling[0]])
            checked += 1
    assert checked > 10


def test_a_special_token_of_both_tokenizers_takes_the_teachers_row(cross_job, tmp_path):
    teacher_dir, student_dir, _ = cross_job
    tokenizers = {}
    for name, source in (("teacher", teacher_dir), ("student", student_dir)):
        shutil.copytree(source, tmp_path / name)
        tokenizer = Tokenizer.from_file(str(tmp_path / name / "tokenizer.json"))
        tokenizer.add_special_tokens(["<|sep|>"])
        tokenizer.save(str(tmp_path / name / "tokenizer.json"))
        tokenizers[name] = tokenizer
    vocab = StudentVocab.load(tmp_path / "teacher", tmp_path / "student")
    sep_s, sep_t = tokenizers["student"].token_to_id("<|sep|>"), tokenizers["teacher"].token_to_id("<|sep|>")
    assert vocab.size == 321 and sep_t == 300
    embedding = torch.randn(301, 8, dtype=torch.float64)
    assert torch.equal(vocab.embedding_rows(embedding)[sep_s], embedding[sep_t])
    assert torch.equal(vocab.head_rows(embedding)[sep_s], embedding[sep_t])


def layer_taps(model: CausalLM, ids: torch.Tensor) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Every layer's q, k, v, gate, up, attn_out, ffn_out of `model` on `ids`, and its logits."""
    h = model.embed(ids)
    ctx = Context.of(model.rotary, model.args, ids, h.dtype)
    taps = []
    for layer in model.model.layers:
        taps.append({})
        h = layer(h, ctx, lambda name, value, t=taps[-1]: t.setdefault(name, value))
    return taps, F.linear(model.model.norm(h), model.lm_head_weight)


@pytest.fixture(scope="module")
def tied_job(cross_job, tmp_path_factory):
    """cross_job with a teacher of tied embeddings (qwen3): the student's head rows are its embedding rows."""
    teacher, student, tokens = cross_job
    tied = build_checkpoint(tmp_path_factory.mktemp("tied") / "teacher", "qwen3", vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(Path(teacher) / name, Path(tied) / name)
    return tied, student, tokens


@pytest.mark.parametrize("tied", [False, True])
def test_loss_is_the_formula_on_the_materialised_student_and_the_teacher(cross_job, tied_job, tied):
    job = tied_job if tied else cross_job
    teacher_dir, student_dir, _ = job
    cfg = lrc_cfg(job, **{"model.lrc.init": "svd"})
    model = build_model(cfg, dtype=torch.float32)
    assert model.cross_tokenizer and model.vocab_size == 320 and "vocab_embed.weight" not in model.trainable_state_dict()
    assert hasattr(model, "vocab_head") != tied
    batch = next(build_batches(cfg, 320, 0, 1, 0, True))
    loss_cfg = LossConfig(kl_weight=0.7, clone_weight=0.3, temperature=2.0, chunk_tokens=7)
    loss, metrics = model(**batch, loss_cfg=loss_cfg)

    config = model.student_hf_config()
    assert config.vocab_size == 320 and config.eos_token_id == Tokenizer.from_file(
        str(Path(student_dir) / "tokenizer.json")).token_to_id("<|endoftext|>")
    student = CausalLM(ModelArgs.from_hf(config), config)
    student.load_state_dict(model.student_state_dict())
    teacher = CausalLM.from_pretrained(teacher_dir)
    s_taps, z_s = layer_taps(student, batch["input_ids"])
    t_taps, z_t = layer_taps(teacher, batch["teacher_input_ids"])

    b, k = batch["clone_mask"].nonzero(as_tuple=True)
    i, j = batch["clone_teacher"][b, k], batch["clone_student"][b, k]
    clone = 0.0
    for block, s, t in zip(model.layers, s_taps, t_taps):
        target = {**t, "attn_out": t["attn_out"] @ block.p("o"), "ffn_out": t["ffn_out"] @ block.p("down")}
        clone = clone + sum((s[m][b, j] - target[m][b, i]).pow(2).mean(-1).mean() for m in s)
    b, k = batch["align_mask"].nonzero(as_tuple=True)
    i, j = batch["align_teacher"][b, k], batch["align_student"][b, k]
    t_ids, s_ids = shared_vocabulary(teacher_dir, student_dir)
    logp = torch.log_softmax(z_t[b, i][:, t_ids] / 2.0, -1)
    logq = torch.log_softmax(z_s[b, j][:, s_ids] / 2.0, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    lm = F.cross_entropy(z_s.flatten(0, 1), batch["labels"].flatten())
    assert metrics["clone"].item() == pytest.approx(clone.item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert metrics["lm"].item() == pytest.approx(lm.item(), rel=1e-5)
    assert loss.item() == pytest.approx((lm + 0.7 * kl + 0.3 * clone).item(), rel=1e-5)
    assert 0.2 < metrics["aligned_ratio"].item() < 0.95

    # a micro-batch's clone term counts by its share of the step's compared positions
    share, _ = model(**batch, loss_cfg=LossConfig(lm_weight=0.0, kl_weight=0.0), clone_normalizer=1000)
    (got,) = torch.autograd.grad(share, model.embed_proj)
    full, _ = model(**batch, loss_cfg=LossConfig(lm_weight=0.0, kl_weight=0.0))
    (want,) = torch.autograd.grad(full * batch["clone_mask"].sum().item() / 1000, model.embed_proj)
    assert rel_err(got, want) < 1e-5 and got.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher_input_ids"):
        model(batch["input_ids"], batch["labels"], loss_cfg)


def test_calibration_reads_the_teachers_tokens_and_preflight_names_a_missing_tokenizer(cross_job, tmp_path):
    teacher_dir, student_dir, _ = cross_job
    cfg = lrc_cfg(cross_job, **{"model.lrc.init": "activation", "model.lrc.init_samples": 3})
    windows = calibration_windows(cfg, 320)
    batch = next(build_batches(lrc_cfg(cross_job, micro_batch_size=3, global_batch_size=3), 320, 0, 1, 0, True))
    # the teacher's tokens of the first windows, as many as the shortest has (no padding)
    teacher = TeacherRetokenizer(student_dir, teacher_dir, 64)(torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1))
    shortest = int((teacher["teacher_labels"] != -100).sum(1).min())
    assert shortest < teacher["teacher_input_ids"].shape[1]  # the rows differ in length
    assert torch.equal(windows, teacher["teacher_input_ids"][:, :shortest])
    build_model(cfg, dtype=torch.float32)  # the activation init runs on them
    (tmp_path / "empty").mkdir()
    found = problems(lrc_cfg(cross_job, **{"model.student": str(tmp_path / "empty")}), 1)
    assert any("model.student=" in f and "no tokenizer.json" in f for f in found)


def test_dense_phase_starts_from_the_generated_student_of_its_own_vocabulary(cross_job):
    cfg = lrc_cfg(cross_job, **{"model.lrc.init": "svd"})
    model = build_model(cfg, dtype=torch.float32)
    batch = next(build_batches(cfg, 320, 0, 1, 0, True))
    loss_cfg = LossConfig(kl_weight=0.5, temperature=2.0)
    with torch.no_grad():
        before, student = model(**batch, loss_cfg=loss_cfg)[0], model.student_state_dict()
        model.densify()
        after = model(**batch, loss_cfg=loss_cfg)[0]
    assert model.embed_dense.shape == (320, 16) and model.lm_head_dense.shape == (320, 16)
    assert all(rel_err(model.student_state_dict()[k], v) < 1e-6 for k, v in student.items())
    assert after.item() == pytest.approx(before.item(), rel=1e-5)


def test_a_projected_head_is_refused_across_tokenizers_and_auto_generates(cross_job):
    """The teacher's head has no rows for the student's own vocabulary: lrc.head_logits=project is
    named as the error, and auto generates the head."""
    with pytest.raises(ValueError, match="lrc.head_logits=project reads the teacher's head"):
        build_model(lrc_cfg(cross_job, **{"model.lrc.head_logits": "project"}), dtype=torch.float32)
    assert not build_model(lrc_cfg(cross_job), dtype=torch.float32).projects_head(1)


# ---- the trainer ---------------------------------------------------------------------------------

CURVE = ("loss", "lm", "kl", "clone", "clone/ffn_out", "aligned_ratio", "grad_norm")


def lrc_run(cross_job, run_dir, nproc, *overrides):
    teacher, student, tokens = cross_job
    return run((teacher, tokens), run_dir, nproc, f"--model.student={student}", *overrides)


@pytest.fixture(scope="module")
def lrc_reference(cross_job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lrc_cross_reference")
    return lrc_run(cross_job, run_dir, 1, "--parallel.backend=none"), run_dir


def test_reference_run_learns_and_exports_a_student_of_its_own_vocabulary(cross_job, lrc_reference, tmp_path):
    records, run_dir = lrc_reference
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert all(r["kl"] > 0 and r["clone"] > 0 and 0.2 < r["aligned_ratio"] <= 1 for r in records)
    hf_dir = run_dir / "export_00000006/hf"
    assert (hf_dir / "tokenizer.json").read_bytes() == (Path(cross_job[1]) / "tokenizer.json").read_bytes()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.vocab_size == 320 and hf.config.hidden_size == 32
    # the export's lrc/ rebuilds the model (teacher + tokenizer): its student is the HF one
    model = load_lrc(run_dir / "export_00000006/lrc")
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        config = model.student_hf_config()
        student = CausalLM(ModelArgs.from_hf(config), config)
        student.load_state_dict(model.student_state_dict())
        assert rel_err(hf(ids).logits, student(ids)) < 1e-5
    assert_export_as_from_disk(run_dir, 6, tmp_path)
    meta = json.loads((run_dir / "export_00000006/lrc/lrc_config.json").read_text())
    assert Path(meta["student_tokenizer"]) == Path(cross_job[1]).resolve()
    # the export of that lrc/ dir alone: the same student, with the student's tokenizer
    export_main(str(run_dir / "export_00000006/lrc"), str(tmp_path / "from_lrc"), dtype="float32")
    assert (tmp_path / "from_lrc/tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    with torch.no_grad():
        assert rel_err(AutoModelForCausalLM.from_pretrained(tmp_path / "from_lrc")(ids).logits, hf(ids).logits) < 1e-5


# FSDP with one sequence per micro-batch (the reference has two): only the step's global counts of
# aligned pairs give the reference's means. Stopped at step 2 and resumed: the curve goes on exactly.
@pytest.mark.parametrize("backend, micro_batch", [("fsdp", 1), pytest.param("deepspeed", 2, marks=pytest.mark.slow)])
def test_backends_and_a_resume_match_one_process(cross_job, lrc_reference, tmp_path, backend, micro_batch):
    flags = [f"--parallel.backend={backend}", f"--micro_batch_size={micro_batch}"]
    lrc_run(cross_job, tmp_path, 2, *flags, "--stop_at=2")
    assert_same_curve(lrc_run(cross_job, tmp_path, 2, *flags), lrc_reference[0], CURVE)


# ---- on-policy across tokenizers -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lrc", "kd"])
def test_on_policy_gives_the_teacher_its_tokens_of_the_generated_text(cross_job, method):
    """The student continues every window; the teacher then reads the new text re-tokenized, the KD
    terms compare the pairs aligned on it and the LM term counts the data's tokens only."""
    teacher_dir, student_dir, _ = cross_job
    cfg = lrc_cfg(cross_job, **{"model.method": method, "loss.on_policy_ratio": 1.0, "loss.on_policy_new_tokens": 8,
                                "loss.kl_weight": 1.0})
    model = build_model(cfg, dtype=torch.float32)
    micro = next(build_batches(cfg, 320, 0, 1, 0, True))
    (step,) = on_policy_inputs(model, functools.partial(full_tensors, model), [micro], cfg, torch.device("cpu"),
                               teacher_tokens(cfg))
    assert not torch.equal(step["input_ids"], micro["input_ids"]) and step["metrics"]["on_policy/generated_tokens"] == 32
    windows = torch.cat([step["input_ids"], step["labels"][:, -1:]], 1)
    want = TeacherRetokenizer(student_dir, teacher_dir, 64)(windows)
    keys = ALIGNED_KEYS + (CLONE_KEYS if method == "lrc" else ())
    assert set(keys) <= set(step) and all(torch.equal(step[k], want[k]) for k in keys)
    assert not torch.equal(want["teacher_input_ids"], micro["teacher_input_ids"])
    inputs = {k: v for k, v in {**micro, **step}.items() if k not in ("metrics", "on_policy_seeds")}
    _, metrics = model(**inputs, loss_cfg=cfg.loss)
    # the LM mean over the data's labels alone, rescaled to all labels (the step's token count)
    _, data_only = model(**{**inputs, "labels": step["lm_labels"], "lm_labels": None}, loss_cfg=cfg.loss)
    share = (step["lm_labels"] != -100).sum().item() / step["labels"].numel()
    assert share == 24 / 32 and metrics["lm"].item() == pytest.approx(data_only["lm"].item() * share, rel=1e-5)
    assert metrics["kl"] > 0


def test_on_policy_runs_across_tokenizers_resume_exactly(one_process, cross_job, tmp_path):
    teacher, student, tokens = cross_job
    on = {"model.student": student, "loss.on_policy_ratio": 0.5, "loss.on_policy_new_tokens": 8}
    train(tiny_cfg((teacher, tokens), tmp_path / "ref", **on))
    train(tiny_cfg((teacher, tokens), tmp_path / "resumed", stop_at=2, **on))
    train(tiny_cfg((teacher, tokens), tmp_path / "resumed", **on))

    def records(name):
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    assert_same_curve(records("resumed"), records("ref"), (*CURVE, "on_policy/generated_tokens"))
    assert all(r["on_policy/generated_tokens"] == 2 * 8 for r in records("ref"))

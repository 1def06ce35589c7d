"""Document masking (data.document_mask): a packed window of several documents gives what each
document gives alone, for our decoder, for transformers, and for the LRC student and its losses."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_checkpoint, rel_err
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.model import CausalLM, document_positions
from test_train import run

EOS = 255
LENGTHS = (9, 14, 7)  # longer than the test families' windows (8, 12), so windows bite inside documents


def packed_documents(seed: int = 0) -> tuple[torch.Tensor, list[slice]]:
    """Two windows of three documents each, every one ending with EOS but the last (cut off)."""
    g = torch.Generator().manual_seed(seed)
    rows, spans, start = [], [], 0
    for n in LENGTHS:
        spans.append(slice(start, start + n))
        start += n
    for _ in range(2):
        docs = [torch.randint(0, EOS, (n,), generator=g) for n in LENGTHS]
        for doc in docs[:-1]:
            doc[-1] = EOS
        rows.append(torch.cat(docs))
    return torch.stack(rows), spans


def test_documents_start_after_each_eos():
    docs, positions = document_positions(torch.tensor([[5, EOS, 7, 8, EOS, 9], [EOS, 3, 4, 5, 6, 7]]), EOS)
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]]


def test_a_packed_window_equals_each_document_alone(checkpoint):
    ids, spans = packed_documents()
    ours = CausalLM.from_pretrained(checkpoint)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        unmasked = ours(ids)
        ours.document_eos = EOS
        packed = ours(ids)
        for span in spans:
            alone = ids[:, span]
            assert rel_err(packed[:, span], ours(alone)) < 1e-5
            assert rel_err(packed[:, span], ref(alone).logits) < 1e-5
    assert rel_err(unmasked[:, spans[1]], packed[:, spans[1]]) > 1e-3  # without the mask, documents mix


def test_the_lrc_student_and_its_losses_see_each_document_alone(tmp_path):
    ids, spans = packed_documents(1)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    model = LowRankClone.from_teacher(build_checkpoint(tmp_path / "t", "gemma3"), LRCConfig(32, init_std=0.1), seed=0)
    model.set_document_mask(EOS)
    cfg, normalizer = LossConfig(temperature=2.0), float((labels != -100).sum())
    with torch.no_grad():
        out = model.lockstep(ids)
        total, metrics = model(ids, labels, cfg, normalizer)
        parts = [model(ids[:, s], labels[:, s], cfg, normalizer) for s in spans]
        for span in spans:
            alone = model.lockstep(ids[:, span])
            assert rel_err(out.student_hidden[:, span], alone.student_hidden) < 1e-5
            assert rel_err(out.teacher_hidden[:, span], alone.teacher_hidden) < 1e-5
    # every term is a sum over tokens divided by the window's count: the documents' parts add up to it
    assert sum(p[0] for p in parts).item() == pytest.approx(total.item(), rel=1e-5)
    for key in ("lm", "kl", "clone", "clone/q", "clone/ffn_out"):
        assert sum(p[1][key] for p in parts).item() == pytest.approx(metrics[key].item(), rel=1e-5), key


def test_document_mask_trains_through_the_cli(tiny_job, tmp_path):
    plain = run(tiny_job, tmp_path / "plain", 1, "--steps=1")
    masked = run(tiny_job, tmp_path / "masked", 1, "--steps=1", "--data.document_mask=true")
    assert masked[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-4)  # the tiny job packs many documents

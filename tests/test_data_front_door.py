"""The data front door: saved DatasetDicts need a split, a dead tokenizer worker fails the run at
once, unlistable directories and bad manifests are named, --allow_errors keeps what it read,
the loader catches corrupt token ids, `inspect` shows what was made, --overwrite starts over."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zstandard

from lrc_dist.data import PackedMixture, TokenSet
from lrc_dist.indexed_dataset import CorruptShardError, Manifest
from lrc_dist.sources import find_sources
from test_tokenize import GPT2, ROOT, decoded_texts, jsonl_bytes, kept, make_docs, run

CLI = [sys.executable, str(ROOT / "data_prep" / "tokenize.py")]


def test_a_dataset_dict_needs_a_split_and_gives_only_that_split(tmp_path):
    import datasets

    train, validation = make_docs(16, seed=1), make_docs(20, seed=2)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": validation})}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"is a DatasetDict with splits train, validation: choose one with --split"):
        run(str(tmp_path / "dd"), tmp_path / "out")
    with pytest.raises(ValueError, match=r"\('test' is none of them\)"):
        run(str(tmp_path / "dd"), tmp_path / "out", split="test")
    manifest = run(str(tmp_path / "dd"), tmp_path / "out", split="train")
    assert [s["path"] for s in manifest.sources] == [str((tmp_path / "dd/train").resolve())]
    assert decoded_texts(tmp_path / "out") == kept(train)  # no validation, no dataset_dict.json "document"


def test_a_dead_worker_fails_the_run_at_once_naming_its_files(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array(["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "Größe", "日本語"])
    for i in range(2):  # enough text to keep each worker busy for seconds
        text = "\n".join(json.dumps({"text": " ".join(rng.choice(words, 400))}) for _ in range(6000))
        (tmp_path / f"big{i}.jsonl").write_text(text + "\n")
    proc = subprocess.Popen([*CLI, "--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(GPT2), "--output",
                             str(tmp_path / "out"), "--workers", "2", "--progress", "False"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(workers := [c for c in psutil.Process(proc.pid).children() if "spawn" in " ".join(c.cmdline())]) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # both have started their files
    os.kill(workers[0].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)  # used to hang forever
    assert proc.returncode == 1 and "a tokenizer worker died" in err and "big" in err, err[-2000:]
    assert not psutil.wait_procs(workers[1:], timeout=30)[1], "a worker outlived the run"
    assert not (tmp_path / "out/manifest.json").exists()


def test_an_unlistable_directory_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "data/private").mkdir(parents=True)
    (tmp_path / "data/a.jsonl").write_bytes(jsonl_bytes(make_docs(20)))
    scandir = os.scandir

    def refuse(path="."):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(ValueError, match=r"cannot list .*private \(Permission denied\)"):
        run(str(tmp_path / "data"), tmp_path / "out")


def test_allow_errors_keeps_the_records_read_before_a_truncation(tmp_path):
    docs = make_docs(3000, seed=1)
    blob = zstandard.ZstdCompressor().compress(jsonl_bytes(docs))
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    manifest = run(str(tmp_path / "cut.jsonl.zst"), tmp_path / "out", allow_errors=True)  # one shard would hold all
    (source,) = manifest.sources
    assert source["error"] and source["docs"] > 100, source
    texts = decoded_texts(tmp_path / "out")
    assert texts == kept(docs)[: len(texts)]


def test_manifest_errors_name_the_file(tmp_path):
    run(str(write_docs(tmp_path)), tmp_path / "out")
    manifest = tmp_path / "out/manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:-10])
    with pytest.raises(ValueError, match=rf"{manifest} is not valid JSON"):
        TokenSet.open(tmp_path / "out")
    del good["shards"][0]["max_token_id"], good["tokenizer"]["sha256"]
    manifest.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=rf"{manifest} lacks tokenizer.sha256, shards\[0\].max_token_id"):
        TokenSet.open(tmp_path / "out")


def test_a_manifest_round_trips_and_names_what_it_lacks(tmp_path):
    written = run(str(write_docs(tmp_path)), tmp_path / "out")
    file = tmp_path / "out/manifest.json"
    assert Manifest.read(file) == written and written.split is None
    written.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == file.read_bytes(), "the same bytes as the pipeline wrote"
    part = Manifest(**{**vars(written), "split": {"index": 1, "count": 2}})
    part.write(tmp_path / "part.json")
    assert Manifest.read(tmp_path / "part.json") == part and list(json.loads((tmp_path / "part.json").read_text()))[:6] \
        == ["format", "format_version", "tokenizer", "dtype", "config", "split"]
    broken = json.loads(file.read_text())
    del broken["dtype"], broken["sources"][0]["error"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'broken.json'} lacks dtype, sources\[0\].error: re-create it"):
        Manifest.read(tmp_path / "broken.json")


def write_docs(root, n=30):
    (root / "docs.jsonl").write_bytes(jsonl_bytes(make_docs(n)))
    return root / "docs.jsonl"


def test_the_loader_catches_token_ids_beyond_the_vocabulary(tmp_path):
    manifest = run(str(write_docs(tmp_path)), tmp_path / "out")
    shard = tmp_path / "out" / f"{manifest.shards[0]['name']}.bin"
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
    tokens[40] = 60000  # bit rot: GPT-2 has 50257 ids
    tokens.flush()
    mixture = PackedMixture([TokenSet.open(tmp_path / "out", verify="none")], [1.0], seq_len=32)
    with pytest.raises(CorruptShardError, match=rf"{shard}: token id 60000 at position 40 is outside the vocabulary"):
        for i in range(len(mixture)):
            mixture[i]


def test_inspect_shows_counts_settings_documents_and_windows(tmp_path):
    run(str(write_docs(tmp_path)), tmp_path / "out")
    proc = subprocess.run([*CLI, "inspect", str(tmp_path / "out"), "--docs", "2", "--windows", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "tokens in" in proc.stdout and "tokenizer: gpt2" in proc.stdout and "'text_field': 'text'" in proc.stdout
    assert "--- document 1 (" in proc.stdout and "--- training window 0 (64 + 1 tokens" in proc.stdout
    assert "<|endoftext|>" in proc.stdout  # special tokens shown as written


def test_overwrite_starts_over_and_refuses_foreign_files(tmp_path):
    run(str(write_docs(tmp_path)), tmp_path / "out")
    with pytest.raises(ValueError, match="pass --overwrite to start over"):
        run(str(write_docs(tmp_path)), tmp_path / "out", max_chars=500)
    manifest = run(str(write_docs(tmp_path)), tmp_path / "out", max_chars=500, overwrite=True)
    assert manifest.config["max_chars"] == 500
    (tmp_path / "out/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files that are not a token set's"):
        run(str(write_docs(tmp_path)), tmp_path / "out", overwrite=True)


def test_a_failing_worker_stops_the_run_before_the_queued_files(tmp_path):
    for i in range(6):  # part0 fails at once, while the other worker is still on part1 of five long files
        (tmp_path / f"part{i}.jsonl").write_bytes(jsonl_bytes(make_docs(20 if i == 0 else 3000, seed=i)))
    first = find_sources(str(tmp_path / "part0.jsonl"))[0][0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{first.key}-00000.bin.tmp").mkdir()  # part0's worker cannot write its shard
    with pytest.raises(IsADirectoryError):
        run(str(tmp_path / "*.jsonl"), tmp_path / "out", workers=2)
    assert len(list((tmp_path / "out").glob("*.source.json"))) < 5, "the queued files were tokenized anyway"


def test_overwrite_refuses_split_runs_and_directories_without_a_token_set(tmp_path):
    docs = write_docs(tmp_path)
    with pytest.raises(ValueError, match="--overwrite with --num_splits"):
        run(str(docs), tmp_path / "out", overwrite=True, num_splits=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no token set"):
        run(str(docs), tmp_path / "data", overwrite=True)
    assert (tmp_path / "data/x.json").is_file()

"""data_prep/tokenize.py and the data prep behind it (lrc_dist.sources, documents, pretokenize):
every input format round-trips through the real GPT-2 tokenizer, bad input is counted, reruns
resume, splits merge into the same set."""

import functools
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import zstandard

from lrc_dist import documents, pretokenize
from lrc_dist.data import TokenSet
from lrc_dist.indexed_dataset import Manifest
from lrc_dist.pretokenize import TokenizeError, tokenize_corpus
from lrc_dist.sources import find_sources

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "assets" / "tokenizers" / "gpt2"
EOS = 50256


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Documents with non-ASCII text, odd whitespace, a literal EOS string, empty and long ones."""
    rng = np.random.default_rng(seed)
    words = ["the", "model", "Größe", "naïve", "Ελληνικά", "日本語", "テキスト", "🙂", "don't", "x1234", "\t", "  "]
    docs = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(n)]
    docs[3] = ""  # empty
    docs[7] = " \n\t "  # whitespace only: empty too
    docs[11] = "a literal <|endoftext|> in web text is text\n"
    docs[13] = "long " * 3000 + "end"
    return docs


def kept(docs: list[str]) -> list[str]:
    return [d for d in docs if d.strip()]


def decode_all(out: Path) -> list[list[int]]:
    token_set = TokenSet.open(out, verify="full")
    return [shard.document(i).tolist() for shard in token_set.shards for i in range(shard.num_docs)]


@functools.lru_cache(maxsize=1)
def gpt2() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(GPT2 / "tokenizer.json"))


def decoded_texts(out: Path, special_tokens_are_text: bool = True) -> list[str]:
    tok = gpt2()
    texts = []
    for ids in decode_all(out):
        assert ids[-1] == EOS, "every document ends with EOS"
        if special_tokens_are_text:
            assert EOS not in ids[:-1], "a literal '<|endoftext|>' must not become the EOS id"
        texts.append(tok.decode(ids[:-1], skip_special_tokens=False))
    return texts


def run(inputs, out: Path, **kwargs) -> Manifest:
    return tokenize_corpus(inputs, str(GPT2), str(out), workers=kwargs.pop("workers", 1), progress=False, **kwargs)


def jsonl_bytes(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs).encode()


def write_format(fmt: str, docs: list[str], root: Path) -> Path:
    """Writes `docs` in one input format; returns what to pass as --input."""
    if fmt == "jsonl":
        (root / "docs.jsonl").write_bytes(jsonl_bytes(docs))
        return root / "docs.jsonl"
    if fmt == "jsonl.zst":  # two frames, as parallel compressors write
        half = len(docs) // 2
        blob = b"".join(zstandard.ZstdCompressor().compress(jsonl_bytes(part)) for part in (docs[:half], docs[half:]))
        (root / "docs.jsonl.zst").write_bytes(blob)
        return root / "docs.jsonl.zst"
    if fmt == "json.gz":
        (root / "docs.json.gz").write_bytes(gzip.compress(jsonl_bytes(docs)))
        return root / "docs.json.gz"
    if fmt == "json-array":
        (root / "docs.json").write_text(json.dumps([{"text": d} for d in docs]))
        return root / "docs.json"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "docs.parquet", row_group_size=7)
        return root / "docs.parquet"
    if fmt == "txt":
        for i, d in enumerate(docs):
            (root / f"doc-{i:03d}.txt").write_text(d, encoding="utf-8")
        return root / "doc-*.txt"
    if fmt == "save_to_disk":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "saved"))
        return root / "saved"
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "json.gz", "json-array", "parquet", "txt", "save_to_disk"])
def test_roundtrip_every_format(tmp_path, fmt):
    docs = make_docs()
    inputs = write_format(fmt, docs, tmp_path)
    manifest = run(str(inputs), tmp_path / "out", shard_tokens=500)
    assert decoded_texts(tmp_path / "out") == kept(docs)
    assert len(manifest.shards) > 1 and manifest.dtype == "uint16"
    assert sum(s["skipped"].get("empty", 0) for s in manifest.sources) == 2
    tok = tokenizers.Tokenizer.from_file(str(GPT2 / "tokenizer.json"))
    tok.encode_special_tokens = True  # plain text: "<|endoftext|>" in a document is text
    assert manifest.num_tokens == sum(len(tok.encode(d).ids) + 1 for d in kept(docs))


def test_inputs_may_be_a_list_of_files_directories_and_globs(tmp_path):
    docs = make_docs(30)
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep" / "x.jsonl").write_bytes(jsonl_bytes(docs[:10]))
    (tmp_path / "b" / "y.json.gz").write_bytes(gzip.compress(jsonl_bytes(docs[10:20])))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs[20:])))
    inputs = [str(tmp_path / "a"), str(tmp_path / "b" / "*.gz"), str(tmp_path / "c.jsonl.zst"), str(tmp_path / "a")]
    manifest = run(inputs, tmp_path / "a" / "out")  # an output inside an input directory is not read back
    assert [Path(s["path"]).name for s in manifest.sources] == ["x.jsonl", "y.json.gz", "c.jsonl.zst"]
    assert decoded_texts(tmp_path / "a" / "out") == kept(docs)
    rerun = run(inputs, tmp_path / "a" / "out")
    assert rerun.sources == manifest.sources


def test_chat_conversations_use_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    conversations = [
        [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Größe?"},
            {"from": "gpt", "value": "Size."},
        ],
        [{"from": "human", "value": "日本語"}, {"from": "gpt", "value": "Japanese 🙂"}],
        [{"role": "user", "content": "role/content works too"}, {"role": "assistant", "content": "yes"}],
        [{"from": "robot", "value": "unknown role"}],
        [],
    ]
    records = [{"conversations": c} for c in conversations] + [{"text": "no conversation field"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = run(str(tmp_path / "chat.jsonl"), tmp_path / "out", chat_field="conversations")

    template = AutoTokenizer.from_pretrained(GPT2)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    expected = [
        template.apply_chat_template(
            [{"role": roles.get(t.get("from"), t.get("role")), "content": t.get("value", t.get("content"))} for t in c],
            tokenize=False,
        )
        for c in conversations[:3]
    ]
    assert decoded_texts(tmp_path / "out", special_tokens_are_text=False) == expected
    assert "<|user|>\nGröße?\n<|assistant|>\nSize.\n" in expected[0]
    assert manifest.sources[0]["skipped"] == {"bad_conversation": 2, "missing_field": 1}


def test_conversations_the_template_rejects_are_counted(tmp_path):
    strict = tmp_path / "strict"
    shutil.copytree(GPT2, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    records = [[{"from": "human", "value": "hi"}], [{"from": "system", "value": "x"}, {"from": "human", "value": "hi"}]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"conversations": c}) + "\n" for c in records))
    manifest = tokenize_corpus(
        str(tmp_path / "chat.jsonl"),
        str(strict),
        str(tmp_path / "out"),
        chat_field="conversations",
        workers=1,
        progress=False,
    )
    assert manifest.sources[0]["skipped"] == {"bad_conversation": 1} and manifest.num_docs == 1
    assert decoded_texts(tmp_path / "out", special_tokens_are_text=False) == ["[user] hi\n"]


def test_bad_input_is_counted_and_reported(tmp_path, capsys):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "invalid utf-8 \xff\xfe here"}',
        b'{"text": "unterminated',
        json.dumps({"other": "field"}).encode(),
        json.dumps({"text": 5}).encode(),
        json.dumps({"text": ""}).encode(),
        b'{"text": "lone surrogate \\ud800"}',
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "long document " * 10}).encode(),
        b"",  # blank line: not a record
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "notes.md").write_text("not an input format")
    manifest = run(str(tmp_path), tmp_path / "out", max_chars=50)
    (source,) = manifest.sources
    assert source["records"] == 10 and source["docs"] == 3
    assert source["skipped"] == {"bad_json": 1, "bad_utf8": 2, "missing_field": 3, "empty": 1}
    assert source["modified"] == {"split": 1}
    assert manifest.ignored_paths == [str(tmp_path / "notes.md")]
    assert decoded_texts(tmp_path / "out") == ["good one", "long document " * 10, "good two"]
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'bad.jsonl'}: bad_json 1, bad_utf8 2, missing_field 3, empty 1, split 1" in printed
    assert f"ignored (unknown format): {tmp_path / 'notes.md'}" in printed

    manifest = run(str(tmp_path / "bad.jsonl"), tmp_path / "truncated", max_chars=50, long_docs="truncate")
    assert manifest.sources[0]["modified"] == {"truncated": 1}
    assert decoded_texts(tmp_path / "truncated")[1] == ("long document " * 10)[:50]


def test_shards_record_their_record_ranges_and_counts(tmp_path):
    docs = ["" if i % 5 == 2 else f"document number {i} " * (1 + i % 3) for i in range(30)]
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes(docs))
    manifest = run(str(tmp_path / "d.jsonl"), tmp_path / "out", shard_tokens=12)
    shards = manifest.shards
    assert [s["records"][0] for s in shards[1:]] == [s["records"][1] for s in shards[:-1]]
    assert shards[0]["records"][0] == 0 and shards[-1]["records"][1] == 30
    for shard in shards:
        first, end = shard["records"]
        assert shard["counts"].get("empty", 0) == sum(docs[i] == "" for i in range(first, end))
        assert shard["num_docs"] == sum(docs[i] != "" for i in range(first, end))
    assert decoded_texts(tmp_path / "out") == kept(docs)


def test_unreadable_files_fail_the_run_unless_allowed(tmp_path, capsys):
    docs = make_docs(20)
    (tmp_path / "good.jsonl").write_bytes(jsonl_bytes(docs))
    blob = zstandard.ZstdCompressor().compress(jsonl_bytes(make_docs(3000, seed=1)))  # zstd blocks are 128 KiB
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])  # an interrupted download
    (tmp_path / "junk.json.gz").write_bytes(b"definitely not gzip")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(TokenizeError, match="3 input files could not be read"):
        run(str(tmp_path), tmp_path / "out", shard_tokens=5000)
    assert not (tmp_path / "out" / "manifest.json").exists()
    printed = {line.split(": ")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert "UNREADABLE after" in printed[str(tmp_path / "cut.jsonl.zst")]
    assert "zstd stream is truncated" in printed[str(tmp_path / "cut.jsonl.zst")]
    assert "UNREADABLE after 0 records: BadGzipFile" in printed[str(tmp_path / "junk.json.gz")]
    assert "UNREADABLE after 0 records: ArrowInvalid" in printed[str(tmp_path / "broken.parquet")]

    manifest = run(str(tmp_path), tmp_path / "out", shard_tokens=5000, allow_errors=True)
    errors = {Path(s["path"]).name: s["error"] for s in manifest.sources}
    assert errors["good.jsonl"] is None and all(errors[n] for n in ("cut.jsonl.zst", "junk.json.gz", "broken.parquet"))
    cut = next(s for s in manifest.sources if s["path"].endswith("cut.jsonl.zst"))
    assert cut["docs"] > 0, "shards finished before the cut are kept"
    assert decoded_texts(tmp_path / "out")[-len(kept(docs)) :] == kept(docs)  # junk.json.gz, after it, has none


def test_missing_column_names_the_field(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(TokenizeError):
        run(str(tmp_path / "x.parquet"), tmp_path / "out")
    assert "has no column 'text' (columns: ['content']): pass --text_field" in capsys.readouterr().out
    assert run(str(tmp_path / "x.parquet"), tmp_path / "out2", text_field="content").num_docs == 2


def test_clear_errors_for_bad_tokenizer_or_empty_input(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(FileNotFoundError, match=f"tokenizer directory {tmp_path / 'nope'} does not exist"):
        tokenize_corpus(str(tmp_path / "a.jsonl"), str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "slow").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json.*save_pretrained"):
        tokenize_corpus(str(tmp_path / "a.jsonl"), str(tmp_path / "slow"), str(tmp_path / "out"))
    (tmp_path / "slow" / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizers file"):
        tokenize_corpus(str(tmp_path / "a.jsonl"), str(tmp_path / "slow"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run(str(tmp_path / "*.parquet"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no input files"):
        run(str(tmp_path / "empty"), tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(TokenizeError, match="no documents were tokenized"):
        run(str(tmp_path / "blank.jsonl"), tmp_path / "out")
    (tmp_path / "notes.csv").write_text("x")
    with pytest.raises(ValueError, match="notes.csv: unknown format"):
        run(str(tmp_path / "notes.csv"), tmp_path / "out")


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of every finished shard file: unchanged means not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.suffix in (".bin", ".idx")}


def test_rerun_resumes_after_the_last_finished_shard(tmp_path, monkeypatch):
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_bytes(jsonl_bytes(make_docs(60, seed=i)))
    reference = run(str(tmp_path / "*.jsonl"), tmp_path / "ref", shard_tokens=400)
    assert len(reference.shards) >= 6

    calls = {"n": 0}
    real_encode = pretokenize.encode

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the job were cancelled mid-file
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(documents, "BATCH_RECORDS", 16)
    monkeypatch.setattr(pretokenize, "encode", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "*.jsonl"), tmp_path / "out", shard_tokens=400)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    finished = sorted(p.stem for p in out.glob("*-[0-9][0-9][0-9][0-9][0-9].json"))
    assert finished and not list(out.glob("*.source.json"))
    # A SIGKILL could also leave a renamed shard without its record, and temporary files:
    unrecorded = reference.shards[len(finished)]["name"]
    (out / f"{unrecorded}.bin").write_bytes(b"\0" * 10)
    (out / f"{unrecorded}.idx").write_bytes(b"\0" * 10)
    (out / f"{unrecorded}.bin.tmp").write_bytes(b"\0" * 10)
    before = shard_files(out)

    monkeypatch.setattr(pretokenize, "encode", real_encode)
    resumed = run(str(tmp_path / "*.jsonl"), tmp_path / "out", shard_tokens=400)
    assert resumed.shards == reference.shards and resumed.sources == reference.sources
    after = shard_files(out)
    for name in finished:
        for suffix in (".bin", ".idx"):
            assert after[name + suffix] == before[name + suffix], f"{name} was rewritten"
    assert after[f"{unrecorded}.bin"] != before[f"{unrecorded}.bin"]
    assert decoded_texts(out) == decoded_texts(tmp_path / "ref")

    rerun_before = shard_files(out)
    run(str(tmp_path / "*.jsonl"), tmp_path / "out", shard_tokens=400)
    assert shard_files(out) == rerun_before, "a finished run is not redone"

    with open(tmp_path / "part1.jsonl", "ab") as f:  # a changed input is tokenized again
        f.write(jsonl_bytes(["one more document"]))
    changed = run(str(tmp_path / "*.jsonl"), tmp_path / "out", shard_tokens=400)
    assert changed.num_docs == reference.num_docs + 1
    assert decoded_texts(out) == decoded_texts(tmp_path / "ref") + ["one more document"]
    part0 = {k: v for k, v in rerun_before.items() if k.startswith("part0")}
    assert part0 and all(shard_files(out)[k] == v for k, v in part0.items())
    with pytest.raises(ValueError, match="shard_tokens differ"):
        run(str(tmp_path / "*.jsonl"), tmp_path / "out", shard_tokens=999)


def test_workers_and_slurm_splits_give_the_same_token_set(tmp_path):
    for i in range(5):
        (tmp_path / f"part{i}.jsonl").write_bytes(jsonl_bytes(make_docs(30 + 10 * i, seed=i)))
    reference = run(str(tmp_path / "*.jsonl"), tmp_path / "ref", shard_tokens=700)
    pooled = run(str(tmp_path / "*.jsonl"), tmp_path / "pool", shard_tokens=700, workers=2)
    assert pooled.shards == reference.shards

    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "1",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    script = str(ROOT / "slurm" / "tokenize_array.sh")
    args = [str(tmp_path / "*.jsonl"), str(GPT2), str(tmp_path / "split"), "--shard_tokens", "700"]
    for task in ("1", "0"):
        subprocess.run(
            ["bash", script, *args], env={**env, "SLURM_ARRAY_TASK_ID": task}, check=True, capture_output=True
        )
    parts = [json.loads(p.read_text()) for p in sorted((tmp_path / "split").glob("manifest.split-*.json"))]
    assert [p["split"] for p in parts] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    assert all(p["sources"] for p in parts), "both splits got files"
    merged = subprocess.run(
        ["bash", script, "--merge", str(tmp_path / "split")], env=env, capture_output=True, text=True
    )
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "split" / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()

    (tmp_path / "split" / "manifest.split-00001-of-00002.json").unlink()
    (tmp_path / "split" / "manifest.json").unlink()
    failed = subprocess.run(
        ["bash", script, "--merge", str(tmp_path / "split")], env=env, capture_output=True, text=True
    )
    assert failed.returncode == 1 and "splits [1] of 2 are missing" in failed.stderr


def test_a_failing_worker_fails_the_run(tmp_path):
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_bytes(jsonl_bytes(make_docs(20, seed=i)))
    source = find_sources(str(tmp_path / "part1.jsonl"))[0][0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{source.key}-00000.bin.tmp").mkdir()  # the worker cannot write its shard
    with pytest.raises(IsADirectoryError, match=f"{source.key}-00000.bin.tmp"):
        run(str(tmp_path / "*.jsonl"), tmp_path / "out", workers=2)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "slurm" / "tokenize_array.sh")], check=True)


def test_vocab_over_65536_uses_uint32(tmp_path):
    tok = tokenizers.Tokenizer.from_file(str(GPT2 / "tokenizer.json"))
    tok.add_tokens([f"<x{i}>" for i in range(16000)])  # ids up to 66256
    big = tmp_path / "big"
    big.mkdir()
    tok.save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    docs = ["high ids <x15999> and <x9000> and <x1> here", "plain Größe text"]
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes(docs))
    manifest = tokenize_corpus(str(tmp_path / "d.jsonl"), str(big), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest.dtype == "uint32" and manifest.tokenizer["vocab_size"] == 66257
    ids = decode_all(tmp_path / "out")
    assert 66256 in ids[0] and max(ids[0]) == 66256
    assert [tok.decode(d[:-1], skip_special_tokens=False) for d in ids] == docs
    (shard,) = manifest.shards
    assert (tmp_path / "out" / f"{shard['name']}.bin").stat().st_size == 4 * manifest.num_tokens


def test_token_ids_are_checked_against_the_vocabulary():
    tok = gpt2()
    tokens, lengths = documents.encode(tok, ["Hello world", "a"], [0, 1], EOS, 50257)
    assert tokens.tolist() == [15496, 995, EOS, 64, EOS] and lengths.tolist() == [3, 2]
    with pytest.raises(RuntimeError, match="tokenizer produced id 15496 >= its vocabulary size 1000"):
        documents.encode(tok, ["Hello world"], [0], 0, 1000)


def test_long_documents_are_split_before_spaces():
    text = "word " * 30 + "x" * 100
    pieces = documents._pieces(text, 40)
    assert "".join(pieces) == text and all(len(p) <= 40 for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:4]), "cuts fall before a space while there is one"


def test_cli_tokenize_and_verify(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(make_docs(20)))
    cli = [sys.executable, str(ROOT / "data_prep" / "tokenize.py")]
    done = subprocess.run(
        [
            *cli,
            "--input",
            str(tmp_path / "a.jsonl"),
            "--tokenizer",
            str(GPT2),
            "--output",
            str(tmp_path / "out"),
            "--progress",
            "False",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'out' / 'manifest.json'}" in done.stdout
    verified = subprocess.run([*cli, "verify", str(tmp_path / "out")], capture_output=True, text=True)
    assert verified.returncode == 0 and "verified (full)" in verified.stdout, verified.stderr
    failed = subprocess.run(
        [*cli, "--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and failed.stderr.startswith(f"error: {tmp_path} has no tokenizer.json")

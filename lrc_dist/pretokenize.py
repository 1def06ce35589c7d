"""The tokenizing run: a text corpus into a token set (format: lrc_dist.indexed_dataset), resumable
and split across processes and Slurm array tasks; CLI: lrc_dist.prep (data_prep/tokenize.py).

Per input file ("source"), in one worker process with its own tokenizer:

    read records (lrc_dist.sources) -> documents, batch-encoded with EOS (lrc_dist.documents)
    -> write shards of about shard_tokens tokens (documents never straddle shards)

Inputs: .jsonl/.json (JSON lines, or one JSON array), optionally .gz/.zst compressed; .txt
(one document per file, optionally compressed); .parquet; directories saved with
`datasets.Dataset.save_to_disk`. Plain text is encoded with special-token strings treated as
text, so a literal "<|endoftext|>" in web text can't fake a document boundary; rendered chats
keep their template's special tokens.

Resume protocol. Source S (named by its file name and a hash of its path) writes shards
S-00000, S-00001, ...; each covers a contiguous range of S's records and counts as finished
once its record S-0000k.json exists (written after the .bin/.idx renames). When S is done,
S.source.json is written. A rerun skips sources that have one and restarts an unfinished
source right after its last finished shard, which rebuilds exactly the shards an
uninterrupted run would have written. A file whose size changed since is tokenized again
from its start. The manifest is written last, atomically.

Each input file yields its own shards, all of shard_tokens but its last: a corpus of many
small files gives many small shards (each memory-mapped at training time), so concatenate
tiny files first.

Splits (Slurm arrays): `num_splits`/`split_index` partition the sorted source list by size;
each split writes manifest.split-I-of-N.json, and `merge_splits` combines them into
manifest.json. Shard order in the manifest is by source path, so the token stream is the
same whatever the number of splits or workers.

Bad input is counted per source, never dropped silently: records skipped as bad_json,
bad_utf8, missing_field, bad_conversation or empty; documents split or truncated at
max_chars; and files that could not be read (an error fails the run unless allow_errors).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import multiprocessing
import os
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tokenizers
from tqdm import tqdm

from lrc_dist.documents import MODIFICATIONS, batches, chat_tokenizer, encode
from lrc_dist.indexed_dataset import (
    FORMAT_VERSION,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    tokenizer_sha256,
    write_json_atomic,
)
from lrc_dist.sources import READ_ERRORS, READERS, SKIP_REASONS, Source, find_sources, split_sources
from lrc_dist.tokenizer_files import find_eos, load_tokenizer


class TokenizeError(RuntimeError):
    """The run finished but its output must not be used as is (unreadable files, no documents)."""


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Everything that determines the tokens; a rerun into the same output must match it."""

    tokenizer_sha256: str
    vocab_size: int
    eos_token: str
    eos_id: int
    text_field: str
    chat_field: str | None
    max_chars: int
    long_docs: str
    shard_tokens: int
    format_version: int = FORMAT_VERSION

    @property
    def dtype(self) -> np.dtype:
        return dtype_for_vocab(self.vocab_size)


# ----------------------------------------------------------------------------- settings


def make_config(
    tokenizer_dir: str | Path,
    text_field: str = "text",
    chat_field: str | None = None,
    max_chars: int = 1_000_000,
    long_docs: str = "split",
    shard_tokens: int = 100_000_000,
    eos_token: str | None = None,
) -> TokenizeConfig:
    """Validates the settings and resolves the tokenizer's vocabulary size and EOS id."""
    if long_docs not in ("split", "truncate"):
        raise ValueError(f"long_docs must be 'split' or 'truncate', got {long_docs!r}")
    if max_chars < 1 or shard_tokens < 1:
        raise ValueError(f"max_chars and shard_tokens must be positive, got {max_chars} and {shard_tokens}")
    path = Path(tokenizer_dir).resolve()
    tokenizer = _process_tokenizer(str(path))
    eos_token, eos_id = find_eos(path, tokenizer, eos_token)
    if chat_field is not None:
        chat_tokenizer(str(path))  # fails early, in the main process, when there is no template
    return TokenizeConfig(
        tokenizer_sha256=tokenizer_sha256(path / "tokenizer.json"),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_token=eos_token,
        eos_id=eos_id,
        text_field=text_field,
        chat_field=chat_field,
        max_chars=max_chars,
        long_docs=long_docs,
        shard_tokens=shard_tokens,
    )


@functools.lru_cache(maxsize=1)
def _process_tokenizer(tokenizer_dir: str) -> tokenizers.Tokenizer:
    """The process's tokenizer, loaded once (each worker process has its own)."""
    return load_tokenizer(tokenizer_dir)


# ----------------------------------------------------------------------------- one source


class _SourceShards:
    """Cuts one source's documents into shards and writes each shard's record on completion."""

    def __init__(self, source: Source, config: TokenizeConfig, output: Path):
        self.source, self.config, self.output = source, config, output
        self.shards = self._finished()
        self.first_record = self.shards[-1]["records"][1] if self.shards else 0
        self.pending: list[tuple[int, str]] = []  # events not yet attributed to a shard
        self.writer: ShardWriter | None = None

    def _name(self, k: int) -> str:
        return f"{self.source.key}-{k:05d}"

    def _finished(self) -> list[dict[str, Any]]:
        """The shards a previous run finished, consecutive from the first, if made from this
        version of the file (a changed size means the records moved: start over)."""
        shards = []
        while (record := self.output / f"{self._name(len(shards))}.json").is_file():
            shards.append(json.loads(record.read_text()))
            if shards[-1]["source_bytes"] != self.source.size:
                return []
        return shards

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, doc_records: list[int]) -> None:
        """Appends documents, closing a shard as soon as it reaches shard_tokens."""
        target = self.config.shard_tokens
        doc = token = 0
        while doc < doc_lengths.size:
            if self.writer is None:
                self.writer = ShardWriter(self.output / self._name(len(self.shards)), self.config.dtype)
            cumulative = np.cumsum(doc_lengths[doc:])
            take = min(int(np.searchsorted(cumulative, target - self.writer.num_tokens)) + 1, cumulative.size)
            count = int(cumulative[take - 1])
            self.writer.add(tokens[token : token + count], doc_lengths[doc : doc + take])
            doc, token = doc + take, token + count
            if self.writer.num_tokens >= target:
                self.close(doc_records[doc - 1] + 1)

    def close(self, record_end: int) -> None:
        """Finishes the open shard, which covers records [first_record, record_end)."""
        info = self.writer.finish()
        counts = collections.Counter(event for record, event in self.pending if record < record_end)
        self.pending = [(record, event) for record, event in self.pending if record >= record_end]
        entry = {
            "name": self._name(len(self.shards)),
            "source": self.source.path,
            "source_bytes": self.source.size,
            "records": [self.first_record, record_end],
            "counts": dict(counts),
            **dataclasses.asdict(info),
        }
        write_json_atomic(self.output / f"{entry['name']}.json", entry)
        self.shards.append(entry)
        self.first_record, self.writer = record_end, None

    def report(self, records: int, error: str | None) -> dict[str, Any]:
        counts = collections.Counter(event for _, event in self.pending)
        for shard in self.shards:
            counts.update(shard["counts"])
        return {
            "path": self.source.path,
            "kind": self.source.kind,
            "bytes": self.source.size,
            "records": records,
            "docs": sum(s["num_docs"] for s in self.shards),
            "tokens": sum(s["num_tokens"] for s in self.shards),
            "skipped": {r: counts[r] for r in SKIP_REASONS if counts[r]},
            "modified": {m: counts[m] for m in MODIFICATIONS if counts[m]},
            "error": error,
            "shards": self.shards,
        }


def tokenize_source(
    source: Source, config: TokenizeConfig, tokenizer_dir: str, output: Path, progress: Callable[[int], Any],
    keep_partial: bool = False,
) -> dict[str, Any]:
    """Tokenizes one source into shards (resuming a previous run); returns its report.

    The report has the source's counts, its read error if any (the file could not be read to
    the end: the shards finished before it are kept, and a rerun retries from there; with
    `keep_partial` (--allow_errors) so are the documents read since the last one), and its shard
    records. A source read to the end is marked done by its `_done_file`.
    """
    shards = _SourceShards(source, config, output)
    tokenizer = _process_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = config.chat_field is None
    field = config.chat_field or config.text_field
    error: list[str] = []

    def values() -> Iterator[Any]:  # read errors end the source; errors elsewhere propagate
        try:
            yield from READERS[source.kind](source.path, field, shards.first_record)
        except READ_ERRORS as e:
            error.append(f"{type(e).__name__}: {e}")

    records = shards.first_record
    try:
        chat_dir = tokenizer_dir if config.chat_field is not None else None
        for batch in batches(values(), shards.first_record, config.max_chars, config.long_docs, chat_dir):
            shards.pending += batch.events
            records = batch.end
            if batch.texts:
                tokens, lengths = encode(tokenizer, batch.texts, batch.piece_doc, config.eos_id, config.vocab_size)
                shards.add(tokens, lengths, batch.doc_records)
                progress(tokens.size)
        if shards.writer is not None and (not error or keep_partial):
            shards.close(records)
    finally:
        if shards.writer is not None:
            shards.writer.abort()  # a failed or interrupted source leaves no shard that looks complete
    report = shards.report(records, error[0] if error else None)
    if not error:
        write_json_atomic(_done_file(output, source), report)
    return report


def _done_file(output: Path, source: Source) -> Path:
    return output / f"{source.key}.source.json"


def _finished_report(output: Path, source: Source) -> dict[str, Any] | None:
    """The report of an earlier run that read this version of the file to its end, if any."""
    file = _done_file(output, source)
    report = json.loads(file.read_text()) if file.is_file() else None
    return report if report is not None and report["bytes"] == source.size else None


# ----------------------------------------------------------------------------- the run

_progress_queue: Any = None


def _init_worker(threads: int, progress_queue: Any) -> None:
    # Runs before the worker's first encode, so the Rust thread pool sizes itself from it.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _progress_queue
    _progress_queue = progress_queue


def _report_progress(tokens: int) -> None:
    _progress_queue.put(tokens)


def _tokenize_in_worker(source: Source, *args) -> dict[str, Any]:
    _progress_queue.put(source.path)  # started: named if this worker dies
    return tokenize_source(source, *args)


def _run(
    sources: list[Source], config: TokenizeConfig, tokenizer_dir: str, output: Path, workers: int | None,
    progress: bool, keep_partial: bool = False,
) -> list[dict[str, Any]]:
    """Tokenizes the sources not done yet, in `workers` processes; returns all reports. A worker
    that dies (killed, out of memory) fails the run at once, naming the files it had in hand."""
    earlier = {s.path: _finished_report(output, s) for s in sources}
    reports = [r for r in earlier.values() if r is not None]
    todo = [s for s in sources if earlier[s.path] is None]
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, min(workers or cpus, len(todo)))
    bar = tqdm(
        desc=f"tokenizing {len(todo)} files ({len(reports)} done before)",
        unit="tok",
        unit_scale=True,
        disable=not progress or not todo,
        mininterval=1 if os.isatty(2) else 60,  # keep batch logs short
    )
    with bar:
        if workers == 1:  # in-process: tokenizers' own threads use every core
            return reports + [tokenize_source(s, config, tokenizer_dir, output, bar.update, keep_partial) for s in todo]
        context = multiprocessing.get_context("spawn")  # fork would copy the parent's tokenizer threads
        progress_queue = context.Queue()
        initargs = (max(1, cpus // workers), progress_queue)
        started: set[str] = set()
        # ProcessPoolExecutor, not Pool: a worker that dies breaks it (BrokenProcessPool) instead of
        # leaving its task unfinished forever.
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs)
        futures = {pool.submit(_tokenize_in_worker, s, config, tokenizer_dir, output, _report_progress,
                               keep_partial): s for s in todo}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                try:
                    while True:
                        message = progress_queue.get_nowait()
                        started.add(message) if isinstance(message, str) else bar.update(message)
                except queue.Empty:
                    pass
                for future in done:
                    future.result()  # re-raise a worker's failure now, not after every other file
                bar.set_postfix(files=f"{len(futures) - len(pending)}/{len(futures)}")
        except BrokenProcessPool:
            finished = {futures[f].path for f in futures if f.done() and not f.exception()}
            lost = sorted(started - finished) or sorted(s.path for s in todo if s.path not in finished)
            raise TokenizeError(
                f"a tokenizer worker died (killed, or out of memory?) while tokenizing {', '.join(lost)}: what "
                f"was finished is kept; rerun with the same arguments to resume (fewer --workers if memory "
                f"ran out)") from None
        finally:  # on any failure, stop at once: no queued file is started, no worker is left running
            processes = list((pool._processes or {}).values())  # the executor offers no public handle
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
        return reports + [f.result() for f in futures]


def _manifest(reports: list[dict[str, Any]], ignored: list[str], **header: Any) -> Manifest:
    """A manifest (or split part, with `split` in `header`) from per-source reports; shards in
    source-path order. header: tokenizer, dtype, config (and split)."""
    reports = sorted(reports, key=lambda r: r["path"])
    shards = [shard for r in reports for shard in r["shards"]]
    return Manifest(
        **header,
        num_tokens=sum(s["num_tokens"] for s in shards),
        num_docs=sum(s["num_docs"] for s in shards),
        shards=shards,
        sources=[{**r, "shards": [s["name"] for s in r["shards"]]} for r in reports],
        ignored_paths=sorted(set(ignored)),
    )


# What tokenize_corpus writes into an output directory (shards are SOURCEKEY-NNNNN.*).
OUTPUT_FILES = ("config.json", "manifest.json", "manifest.split-*-of-*.json", "*.source.json",
                "*-[0-9][0-9][0-9][0-9][0-9].bin", "*-[0-9][0-9][0-9][0-9][0-9].idx",
                "*-[0-9][0-9][0-9][0-9][0-9].json", "*.tmp")


def _clear_output(output: Path) -> None:
    """--overwrite: removes an earlier token set's files; refuses a directory holding others."""
    if not output.is_dir():
        return
    if not (output / "config.json").is_file():
        raise ValueError(f"--overwrite: {output} holds no token set (no config.json): choose another --output")
    ours = {p for pattern in OUTPUT_FILES for p in output.glob(pattern)}
    others = sorted(str(p) for p in output.iterdir() if p not in ours)
    if others:
        raise ValueError(f"--overwrite: {output} holds files that are not a token set's ({', '.join(others[:3])}): "
                         f"choose another --output")
    for path in ours:
        path.unlink()


def _check_output(output: Path, config: TokenizeConfig) -> None:
    """Refuses to mix shards made with other settings into an existing output directory."""
    file = output / "config.json"
    current = dataclasses.asdict(config)
    if file.is_file():
        previous = json.loads(file.read_text())
        changed = sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))
        if changed:
            raise ValueError(
                f"{output} holds shards made with other settings ({', '.join(changed)} differ, see {file}): "
                "use a new --output, or pass --overwrite to start over"
            )
    else:
        write_json_atomic(file, current)


def tokenize_corpus(
    input: str | Sequence[str],
    tokenizer: str,
    output: str,
    text_field: str = "text",
    chat_field: str | None = None,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    max_chars: int = 1_000_000,
    long_docs: str = "split",
    eos_token: str | None = None,
    num_splits: int = 1,
    split_index: int = 0,
    allow_errors: bool = False,
    progress: bool = True,
    split: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Tokenizes `input` into the token set directory `output`; returns the manifest written.

    input: a file, a directory (walked recursively), a glob, or a list of them.
    tokenizer: a directory with tokenizer.json (and tokenizer_config.json for the EOS token and
        the chat template). text_field / chat_field: the record field holding the document, or
        the OpenHermes-style conversation to render with the chat template.
    workers: processes (default: the CPUs this process may use); each handles whole files.
    shard_tokens: target shard size. max_chars, long_docs: documents longer than max_chars are
        cut into pieces tokenized one after another ("split") or cut off ("truncate").
    eos_token: the token appended to every document (default: tokenizer_config.json's eos_token).
    num_splits, split_index: process one part of the inputs (Slurm arrays); the part writes
        manifest.split-I-of-N.json, and `merge_splits` writes manifest.json.
    allow_errors: write the manifest even if some files could not be read to the end, with what
        was read of them before the error.
    progress: show a progress bar with tokens/s (on stderr).
    split: the split to read of a `datasets.DatasetDict` saved to disk (e.g. train).
    overwrite: delete an earlier token set in `output` first, instead of resuming it.

    Raises TokenizeError (after printing the per-file report) when files could not be read
    or no document came out; ValueError / FileNotFoundError for bad settings or inputs.
    """
    out = Path(output).resolve()
    config = make_config(tokenizer, text_field, chat_field, max_chars, long_docs, shard_tokens, eos_token)
    sources, ignored = find_sources(input, exclude=out, split=split)
    mine = split_sources(sources, num_splits, split_index)
    if overwrite and num_splits > 1:
        raise ValueError("--overwrite with --num_splits: every split would delete the others' shards; clear the "
                         "output once before the array runs instead")
    if overwrite:
        _clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_output(out, config)
    tokenizer_dir = str(Path(tokenizer).resolve())
    reports = _run(mine, config, tokenizer_dir, out, workers, progress, keep_partial=allow_errors)
    tokenizer_entry = {
        "name": Path(tokenizer_dir).name,
        "path": tokenizer_dir,
        "sha256": config.tokenizer_sha256,
        "vocab_size": config.vocab_size,
        "eos_token": config.eos_token,
        "eos_id": config.eos_id,
    }
    split_entry = {"index": split_index, "count": num_splits} if num_splits > 1 else None
    manifest = _manifest(reports, ignored, tokenizer=tokenizer_entry, dtype=config.dtype.name,
                         config=dataclasses.asdict(config), split=split_entry)
    print(manifest.summary())
    failed = [s["path"] for s in manifest.sources if s["error"]]
    if failed and not allow_errors:
        raise TokenizeError(
            f"{len(failed)} input files could not be read to the end (listed above, first: {failed[0]}): fix or "
            "remove them and rerun (finished files are skipped), or pass --allow_errors to keep what was read"
        )
    if mine and manifest.num_docs == 0:
        raise TokenizeError(
            f"no documents were tokenized from {len(mine)} files (counts above): check --text_field/--chat_field"
        )
    name = f"manifest.split-{split_index:05d}-of-{num_splits:05d}.json" if num_splits > 1 else "manifest.json"
    manifest.write(out / name)
    print(f"wrote {out / name}")
    return manifest


def merge_splits(output: str) -> Manifest:
    """Combines the split manifests of a token set directory into its manifest.json."""
    out = Path(output)
    files = sorted(out.glob("manifest.split-*-of-*.json"))
    if not files:
        raise FileNotFoundError(
            f"{out} has no manifest.split-*-of-*.json: run the splits (slurm/tokenize_array.sh) first"
        )
    parts = [Manifest.read(file) for file in files]
    for file, part in zip(files, parts, strict=True):
        if part.split is None:
            raise ValueError(f"{file} has no \"split\": it is not a split part; remove it or rename it")
    count = parts[0].split["count"]
    missing = sorted(set(range(count)) - {p.split["index"] for p in parts if p.split["count"] == count})
    if missing or any(p.split["count"] != count for p in parts):
        raise ValueError(
            f"{out}: splits {missing} of {count} are missing (or counts differ): rerun those split indices"
        )
    if any(p.config != parts[0].config for p in parts):
        raise ValueError(
            f"{out}: the split manifests were made with different settings: retokenize into a new --output"
        )
    shards = {s["name"]: s for p in parts for s in p.shards}
    reports = [{**source, "shards": [shards[n] for n in source["shards"]]} for p in parts for source in p.sources]
    manifest = _manifest(reports, [path for p in parts for path in p.ignored_paths],
                         tokenizer=parts[0].tokenizer, dtype=parts[0].dtype, config=parts[0].config)
    manifest.write(out / "manifest.json")
    print(manifest.summary())
    print(f"wrote {out / 'manifest.json'}")
    return manifest

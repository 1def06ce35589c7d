"""The inputs of tokenizing: which files (and saved datasets) a `--input` names, and readers that
yield one value per record of each.

A reader yields one value per record, from record `start` on: the field's value (None when
absent) or a Skip. Record numbers must be stable across runs: they are the resume points.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst", ".zstd")
BATCH_RECORDS = 1024  # records per read batch (and at most per encode batch)
# Reading errors that make a file "unreadable" (reported), as opposed to bugs or a full disk.
READ_ERRORS = (OSError, EOFError, ValueError, zstandard.ZstdError)
# Why a record yields no document: unreadable (bad_json, bad_utf8; the readers), no document value
# (missing_field, bad_conversation, empty; lrc_dist.documents).
SKIP_REASONS = ("bad_json", "bad_utf8", "missing_field", "bad_conversation", "empty")


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record that yields no document, and why (one of SKIP_REASONS)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: a file, or a directory written by `datasets.Dataset.save_to_disk`."""

    path: str
    kind: str  # "json" | "text" | "parquet" | "arrow"
    size: int

    @property
    def key(self) -> str:
        """Shard name prefix: readable file name plus a hash of the full path (unique)."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.path).name)[:60]
        return f"{name}-{hashlib.sha1(self.path.encode()).hexdigest()[:8]}"


def _kind(path: Path) -> str | None:
    name = path.name
    compressed = name.endswith(COMPRESSIONS)
    if compressed:
        name = name[: name.rfind(".")]
    kind = FORMATS.get(Path(name).suffix)
    return None if kind == "parquet" and compressed else kind


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _dataset_dict_splits(path: Path) -> list[str] | None:
    """The splits of a `datasets.DatasetDict` saved to disk at `path`, or None if it is none."""
    file = path / "dataset_dict.json"
    if not file.is_file():
        return None
    try:
        return list(json.loads(file.read_text())["splits"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is not a datasets DatasetDict index ({type(e).__name__}: {e})") from None


def _unlistable(error: OSError) -> None:
    raise ValueError(f"--input: cannot list {error.filename} ({error.strerror}): fix its permissions or leave it out")


def find_sources(
    inputs: str | Path | Sequence[str | Path], exclude: Path | None = None, split: str | None = None
) -> tuple[list[Source], list[str]]:
    """Resolves files, directories (walked recursively) and globs into sorted sources.

    Returns (sources, ignored): files met while walking directories that have no known format
    are returned as `ignored` (reported, not read); an explicitly named one is an error. A saved
    `datasets.DatasetDict` contributes its split `split` only (an error listing them without it).
    A directory that cannot be listed is an error, never a silent skip.
    """
    specs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    found: dict[str, Source] = {}
    ignored: list[str] = []

    def add(path: Path, kind: str) -> None:
        files = path.rglob("*") if kind == "arrow" else [path]
        found[str(path)] = Source(str(path), kind, sum(f.stat().st_size for f in files if f.is_file()))

    for spec in map(str, specs):
        matches = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise FileNotFoundError(f"--input {spec!r} matches no file")
        for match in matches:
            path = Path(match).resolve()
            if not path.exists():
                raise FileNotFoundError(f"--input {path}: no such file or directory")
            if path.is_file():
                if (kind := _kind(path)) is None:
                    raise ValueError(
                        f"--input {path}: unknown format (expected .jsonl/.json/.txt, optionally .gz/.zst, "
                        ".parquet, or a datasets save_to_disk directory)"
                    )
                add(path, kind)
                continue
            for root, dirs, files in os.walk(path, onerror=_unlistable):
                root_path = Path(root)
                splits = _dataset_dict_splits(root_path)
                if splits is not None:  # train and validation must not merge into one token set
                    if split not in splits:
                        raise ValueError(f"--input {root_path} is a DatasetDict with splits {', '.join(splits)}: "
                                         f"choose one with --split" + (f" ({split!r} is none of them)" if split else ""))
                    add(root_path / split, "arrow")
                    dirs.clear()
                    continue
                if _is_saved_dataset(root_path):
                    add(root_path, "arrow")
                    dirs.clear()
                    continue
                dirs[:] = sorted(d for d in dirs if exclude is None or root_path / d != exclude)
                for file in sorted(files):
                    if (kind := _kind(root_path / file)) is None:
                        ignored.append(str(root_path / file))
                    else:
                        add(root_path / file, kind)
    if not found:
        raise ValueError(f"--input {specs} holds no input files of a known format (ignored: {ignored[:5]})")
    return sorted(found.values(), key=lambda s: s.path), ignored


def split_sources(sources: list[Source], num_splits: int, split_index: int) -> list[Source]:
    """The sources of split `split_index`: greedy by size (largest first), so splits balance."""
    if not 0 <= split_index < num_splits:
        raise ValueError(f"split_index must be in [0, num_splits={num_splits}), got {split_index}")
    loads = [0] * num_splits
    mine = set()
    for source in sorted(sources, key=lambda s: (-s.size, s.path)):
        split = min(range(num_splits), key=lambda i: (loads[i], i))
        loads[split] += source.size
        if split == split_index:
            mine.add(source.path)
    return [s for s in sources if s.path in mine]


# ----------------------------------------------------------------------------- readers
# A reader yields one value per record, from record `start` on: the field's value (None when
# absent) or a Skip. Record numbers must be stable across runs: they are the resume points.


class _ZstdFile(io.RawIOBase):
    """A (multi-frame) zstd file as a byte stream. zstandard's stream_reader ends quietly in
    a cut-off frame; a truncated download must be an error, so frames are tracked here."""

    def __init__(self, path: str):
        self._file = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # data of the current frame was fed and its end not yet seen
        self._out = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            data = self._file.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError(f"{self._file.name}: zstd stream is truncated (its last frame is cut off)")
                return 0
            out = []
            while data:
                if self._frame.eof:  # the previous frame ended: the rest starts a new one
                    self._frame = zstandard.ZstdDecompressor().decompressobj()
                out.append(self._frame.decompress(data))
                data = self._frame.unused_data if self._frame.eof else b""
            self._in_frame = not self._frame.eof
            self._out, self._pos = memoryview(b"".join(out)), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: str) -> BinaryIO:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFile(path), buffer_size=1 << 20)
    return open(path, "rb")


def _field(record: Any, field: str) -> Any:
    return record.get(field) if isinstance(record, dict) else None


def _read_json(path: str, field: str, start: int) -> Iterator[Any]:
    with _open_binary(path) as f:
        if f.peek(1 << 16).lstrip()[:1] == b"[":  # one JSON array (e.g. OpenHermes-2.5's file)
            yield from (_field(r, field) for r in json.load(f)[start:])
            return
        for line in itertools.islice((line for line in f if not line.isspace()), start, None):
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield Skip("bad_utf8")
                continue
            except ValueError:
                yield Skip("bad_json")
                continue
            yield _field(record, field)


def _read_text(path: str, field: str, start: int) -> Iterator[Any]:
    if start == 0:
        with _open_binary(path) as f:
            data = f.read()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            yield Skip("bad_utf8")


def _require_column(path: str, columns: list[str], field: str) -> None:
    if field not in columns:
        raise ValueError(f"{path} has no column {field!r} (columns: {columns}): pass --text_field or --chat_field")


def _read_parquet(path: str, field: str, start: int) -> Iterator[Any]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _require_column(path, parquet.schema_arrow.names, field)
    first_group = 0  # skip whole row groups from the metadata, without reading them
    while first_group < parquet.num_row_groups and start >= (rows := parquet.metadata.row_group(first_group).num_rows):
        start -= rows
        first_group += 1
    batches = parquet.iter_batches(
        batch_size=BATCH_RECORDS, row_groups=range(first_group, parquet.num_row_groups), columns=[field]
    )
    yield from itertools.islice(itertools.chain.from_iterable(b.column(0).to_pylist() for b in batches), start, None)


def _read_saved_dataset(path: str, field: str, start: int) -> Iterator[Any]:
    import datasets

    dataset = datasets.load_from_disk(path)
    _require_column(path, dataset.column_names, field)
    dataset = dataset.select_columns([field]).select(range(start, len(dataset)))  # contiguous: no copy
    for batch in dataset.iter(batch_size=BATCH_RECORDS):
        yield from batch[field]


READERS: dict[str, Callable[[str, str, int], Iterator[Any]]] = {
    "json": _read_json,
    "text": _read_text,
    "parquet": _read_parquet,
    "arrow": _read_saved_dataset,
}



"""On-disk format of a tokenized corpus ("token set"): shards of token ids plus a manifest.

A token set is one directory written by `data_prep/tokenize.py` and read by `lrc_dist.data`.

Shards (Megatron's indexed dataset, simplified). A shard is two files sharing a name:

    NAME.bin  the token ids of its documents back to back, little-endian uint16 when the
              vocabulary fits (vocab_size <= 65536), else uint32. Every document ends with
              the tokenizer's EOS id, so concatenating shards keeps document boundaries.
    NAME.idx  a 32-byte header, then the document offsets:
                bytes  0-7   magic b"LRCTOKS\\0"
                bytes  8-11  format version, uint32 little-endian (FORMAT_VERSION)
                bytes 12-15  dtype code, uint32: 1 = uint16, 2 = uint32
                bytes 16-23  number of documents D, uint64
                bytes 24-31  number of tokens N, uint64
                bytes 32-    D + 1 offsets, uint64: document i is tokens[offsets[i]:offsets[i+1]],
                             offsets[0] = 0 and offsets[D] = N

Both files are written under temporary names, fsynced and renamed (.bin before .idx), so a
file with a final name is complete; a shard counts as finished only once its record
NAME.json exists (see lrc_dist/pretokenize.py for the resume protocol).

manifest.json, written last and atomically, describes the whole set (class Manifest: written,
read and checked here):

    format, format_version      "lrc_dist.tokens", FORMAT_VERSION
    tokenizer                   {name, path, sha256 (of tokenizer.json), vocab_size, eos_token, eos_id}
    dtype                       "uint16" | "uint32"
    config                      the settings that shaped the tokens (fields, max_chars, ...)
    num_tokens, num_docs        totals over all shards
    shards                      in stream order: {name, source, source_bytes, records: [first,
                                end), counts, num_tokens, num_docs, max_token_id, bin_bytes,
                                bin_blake2b, bin_sample_blake2b, idx_blake2b}
    sources                     per input file: {path, kind, bytes, records, docs, tokens,
                                skipped, modified, error, shards}
    ignored_paths               files met in input directories that are not a known format

A split run (Slurm array task I of N) writes the same for its files to
manifest.split-I-of-N.json (five-digit I and N), with "split": {index, count} after config;
merging the N parts gives the manifest.json of a run over all files.

Checksums are blake2b-256 hex digests. The "fast" check compares the .bin size, the digest of
SAMPLE_BLOCKS blocks spread over the .bin (first and last included) and the digest of the
whole (small) .idx; the "full" check also hashes the whole .bin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

FORMAT_VERSION = 1
MAGIC = b"LRCTOKS\0"
HEADER = struct.Struct("<8sIIQQ")
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 1 << 16
VERIFY_MODES = ("none", "fast", "full")


class CorruptShardError(ValueError):
    """A shard file is missing, truncated or does not match its manifest checksums."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds ids 0 .. vocab_size - 1."""
    return DTYPES[1] if vocab_size <= 1 << 16 else DTYPES[2]


def _hasher() -> hashlib._Hash:
    return hashlib.blake2b(digest_size=32)


def file_digest(path: Path) -> str:
    """blake2b-256 of a whole file (the "full" check)."""
    hasher = _hasher()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            hasher.update(chunk)
    return hasher.hexdigest()


def sampled_digest(path: Path) -> str:
    """blake2b-256 of a file's size and SAMPLE_BLOCKS evenly spread blocks (the "fast" check)."""
    size = path.stat().st_size
    hasher = _hasher()
    hasher.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            hasher.update(f.read())
        else:
            for k in range(SAMPLE_BLOCKS):
                f.seek(k * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
                hasher.update(f.read(SAMPLE_BLOCK_BYTES))
    return hasher.hexdigest()


def tokenizer_sha256(tokenizer_json: Path) -> str:
    """sha256 of a tokenizer.json file: the identity of the tokenizer a token set was made with."""
    return hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()


def fsync_dir(path: Path) -> None:
    """Makes renames inside `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON so that `path` either keeps its old content or holds all of the new one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """Sizes and checksums of one finished shard, as stored in the manifest."""

    num_tokens: int
    num_docs: int
    max_token_id: int
    bin_bytes: int
    bin_blake2b: str
    bin_sample_blake2b: str
    idx_blake2b: str

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> ShardInfo:
        return cls(**{f.name: entry[f.name] for f in dataclasses.fields(cls)})


# What reading a manifest requires of its entries (besides every field of Manifest).
TOKENIZER_KEYS = ("name", "path", "sha256", "vocab_size", "eos_id")
SHARD_KEYS = ("name", "source", *(f.name for f in dataclasses.fields(ShardInfo)))
SOURCE_KEYS = ("path", "records", "skipped", "modified", "error", "shards")


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """A token set's manifest.json, or a split part's manifest.split-I-of-N.json (then `split` is
    {index, count}): the keys of the module doc, written in that order. Its entries (tokenizer,
    config, shards, sources) are the JSON objects documented there."""

    FORMAT: ClassVar[str] = "lrc_dist.tokens"  # the "format" key; "format_version" is FORMAT_VERSION

    tokenizer: dict[str, Any]
    dtype: str
    config: dict[str, Any]
    split: dict[str, int] | None = None
    num_tokens: int
    num_docs: int
    shards: list[dict[str, Any]]
    sources: list[dict[str, Any]]
    ignored_paths: list[str]

    def to_json(self) -> dict[str, Any]:
        """The JSON object the file holds (`split` only in a split part)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.split is None:
            del fields["split"]
        return {"format": self.FORMAT, "format_version": FORMAT_VERSION, **fields}

    def write(self, path: Path) -> None:
        """Writes the manifest to `path` atomically."""
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def read(cls, file: Path) -> Manifest:
        """Reads and checks a manifest, with an error naming the file and what is wrong instead
        of a bare JSONDecodeError or KeyError."""
        fix = "re-create it with data_prep/tokenize.py (the same arguments resume what is done)"
        try:
            manifest = json.loads(Path(file).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON ({e}): {fix}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != cls.FORMAT:
            raise ValueError(f"{file} is not an lrc_dist token-set manifest (no \"format\": \"{cls.FORMAT}\")")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{file} has format_version {manifest.get('format_version')}; this lrc_dist reads "
                             f"{FORMAT_VERSION}: {fix}")
        keys = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in keys if k != "split" and k not in manifest]
        missing += [f"tokenizer.{k}" for k in TOKENIZER_KEYS if k not in manifest.get("tokenizer", {})]
        if "split" in manifest:
            missing += [f"split.{k}" for k in ("index", "count") if not isinstance(manifest["split"], dict)
                        or k not in manifest["split"]]
        for name, entry_keys in (("shards", SHARD_KEYS), ("sources", SOURCE_KEYS)):
            for i, entry in enumerate(manifest.get(name, [])):
                missing += [f"{name}[{i}].{k}" for k in entry_keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{file} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: {fix}")
        return cls(**{k: manifest[k] for k in keys if k in manifest})

    def summary(self) -> str:
        """Counts, and each source's skipped and modified records and read error, in a few lines."""
        lines = [
            f"{self.num_tokens:,} tokens in {self.num_docs:,} documents, {len(self.shards)} shards, "
            f"from {len(self.sources)} files"
        ]
        for source in self.sources:
            issues = [f"{k} {v}" for k, v in {**source["skipped"], **source["modified"]}.items()]
            if source["error"]:
                issues.append(f"UNREADABLE after {source['records']} records: {source['error']}")
            if issues:
                lines.append(f"  {source['path']}: {', '.join(issues)}")
        lines += [f"  ignored (unknown format): {path}" for path in self.ignored_paths]
        return "\n".join(lines)


class ShardWriter:
    """Appends documents to a new shard NAME.bin/.idx; `finish()` makes it visible atomically.

    Documents arrive in chunks (flat tokens + per-document lengths) and are written straight to
    NAME.bin.tmp while the full-file checksum is updated, so memory holds only the offsets.
    """

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._code = next(code for code, d in DTYPES.items() if d == self.dtype)
        self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._hasher = _hasher()
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0
        self.max_token_id = -1

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Appends documents: `tokens` is their concatenation, `doc_lengths` their sizes."""
        assert tokens.size == int(doc_lengths.sum()), "doc_lengths must sum to len(tokens)"
        if tokens.size == 0:
            return
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(data)
        self._hasher.update(data)
        self._lengths.append(np.asarray(doc_lengths, dtype=np.uint64))
        self.num_tokens += data.size
        self.max_token_id = max(self.max_token_id, int(data.max()))

    def finish(self) -> ShardInfo:
        """Flushes, fsyncs and renames both files into place; returns their checksums."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.uint64)
        offsets = np.zeros(lengths.size + 1, dtype="<u8")
        np.cumsum(lengths, out=offsets[1:])
        idx = HEADER.pack(MAGIC, FORMAT_VERSION, self._code, lengths.size, self.num_tokens) + offsets.tobytes()
        with open(self._idx_tmp, "wb") as f:
            f.write(idx)
            f.flush()
            os.fsync(f.fileno())
        bin_path, idx_path = _paths(self.prefix)
        os.replace(self._bin_tmp, bin_path)
        os.replace(self._idx_tmp, idx_path)
        fsync_dir(self.prefix.parent)
        return ShardInfo(
            num_tokens=self.num_tokens,
            num_docs=int(lengths.size),
            max_token_id=self.max_token_id,
            bin_bytes=self.num_tokens * self.dtype.itemsize,
            bin_blake2b=self._hasher.hexdigest(),
            bin_sample_blake2b=sampled_digest(bin_path),
            idx_blake2b=_digest(idx),
        )

    def abort(self) -> None:
        """Drops the unfinished shard (its temporary files)."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)


def _digest(data: bytes) -> str:
    hasher = _hasher()
    hasher.update(data)
    return hasher.hexdigest()


def _paths(prefix: Path) -> tuple[Path, Path]:
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class Shard:
    """A finished shard, memory-mapped: `tokens` (np.memmap) and document `offsets`."""

    def __init__(self, prefix: Path, tokens: np.ndarray, offsets: np.ndarray):
        self.prefix = prefix
        self.tokens = tokens
        self.offsets = offsets

    @property
    def num_docs(self) -> int:
        return self.offsets.size - 1

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, its EOS included."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def open(cls, prefix: Path, expected: ShardInfo | None = None, verify: str = "fast") -> Shard:
        """Opens NAME.bin/.idx; with `expected`, checks them in `verify` mode ("none", "fast", "full").

        Raises CorruptShardError naming the file on a missing, truncated or altered shard.
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        bin_path, idx_path = _paths(Path(prefix))
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise CorruptShardError(f"{path}: shard file is missing")
        idx = idx_path.read_bytes()
        if expected is not None and verify != "none" and _digest(idx) != expected.idx_blake2b:
            raise CorruptShardError(f"{idx_path}: index checksum does not match the manifest (corrupt or replaced)")
        if len(idx) < HEADER.size:
            raise CorruptShardError(f"{idx_path}: truncated index ({len(idx)} bytes, header needs {HEADER.size})")
        magic, version, code, num_docs, num_tokens = HEADER.unpack_from(idx)
        if magic != MAGIC or version != FORMAT_VERSION or code not in DTYPES:
            raise CorruptShardError(
                f"{idx_path}: not an lrc_dist shard index of version {FORMAT_VERSION} "
                f"(magic {magic!r}, version {version}, dtype code {code})"
            )
        if len(idx) != HEADER.size + 8 * (num_docs + 1):
            raise CorruptShardError(f"{idx_path}: truncated index ({len(idx)} bytes for {num_docs} documents)")
        dtype = DTYPES[code]
        size = bin_path.stat().st_size
        if size != num_tokens * dtype.itemsize:
            raise CorruptShardError(
                f"{bin_path}: truncated or oversized token file ({size} bytes, index says "
                f"{num_tokens} tokens of {dtype.itemsize} bytes)"
            )
        if expected is not None and verify != "none":
            if size != expected.bin_bytes or num_tokens != expected.num_tokens:
                raise CorruptShardError(f"{bin_path}: {size} bytes, manifest says {expected.bin_bytes}")
            if sampled_digest(bin_path) != expected.bin_sample_blake2b:
                raise CorruptShardError(f"{bin_path}: sampled-block checksum does not match the manifest (corrupt)")
            if verify == "full" and file_digest(bin_path) != expected.bin_blake2b:
                raise CorruptShardError(f"{bin_path}: full checksum does not match the manifest (corrupt)")
        offsets = np.frombuffer(idx, dtype="<u8", offset=HEADER.size)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        return cls(Path(prefix), tokens, offsets)

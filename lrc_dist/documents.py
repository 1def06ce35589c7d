"""From a record to a document's tokens: what `lrc_dist.pretokenize` does with each value a reader
(`lrc_dist.sources`) yields.

    value -> document text: the text field as it is, or the conversation (OpenHermes-style
             [{"from": "human", "value": ...}], or role/content) rendered with the tokenizer's
             chat template; or a Skip naming why there is none (sources.SKIP_REASONS)
    -> a text longer than max_chars is cut into pieces of at most max_chars ("split", tokens
       concatenated back into one document) or cut off ("truncate")
    -> batches of pieces, each encoded in one `encode_batch` call, every document followed by EOS

Every skip and modification is reported with its record number, so a run can count them per
shard and per source.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tokenizers
from jinja2 import TemplateError

from lrc_dist.sources import BATCH_RECORDS, Skip

MODIFICATIONS = ("split", "truncated")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# A batch is encoded in one `encode_batch` call: large enough to keep the Rust threads busy,
# bounded in characters (and records: sources.BATCH_RECORDS) so huge documents can't exhaust memory.
BATCH_CHARS = 16 << 20


@functools.lru_cache(maxsize=1)
def chat_tokenizer(tokenizer_dir: str) -> Any:
    """The transformers tokenizer of DIR whose chat template renders conversations (loaded once)."""
    from transformers import AutoTokenizer  # only chat rendering needs transformers

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError(
            f"{tokenizer_dir} has no chat template (chat_template.jinja or 'chat_template' in "
            "tokenizer_config.json): use the teacher's tokenizer directory, or drop --chat_field"
        )
    return tokenizer


def _conversation(value: Any) -> list[dict[str, str]] | None:
    """OpenHermes-style [{"from": "human", "value": ...}] (or role/content) -> chat messages."""
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for turn in value:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(turn.get("from", turn.get("role")))
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def _document(value: Any, chat_dir: str | None) -> str | Skip:
    """A record's document text, or why there is none; `chat_dir`: see `batches`."""
    if isinstance(value, Skip):
        return value
    if value is None:
        return Skip("missing_field")
    if chat_dir is not None:
        messages = _conversation(value)
        if messages is None:
            return Skip("bad_conversation")
        try:
            value = chat_tokenizer(chat_dir).apply_chat_template(messages, tokenize=False)
        except TemplateError:  # the template refuses it, e.g. roles that do not alternate
            return Skip("bad_conversation")
    if not isinstance(value, str):
        return Skip("missing_field")
    if not value or value.isspace():
        return Skip("empty")
    try:
        value.encode("utf-8")  # JSON escapes can smuggle in lone surrogates the tokenizer rejects
    except UnicodeEncodeError:
        return Skip("bad_utf8")
    return value


def _pieces(text: str, max_chars: int) -> list[str]:
    """Cuts a long document into pieces of at most max_chars, preferably before a space (GPT-2
    style pre-tokenizers attach a leading space to the next word, so such cuts keep tokens
    natural). The pieces' tokens are concatenated back into one document."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = cut if cut > start else start + max_chars
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


@dataclasses.dataclass
class Batch:
    """Documents of consecutive records, as pieces ready for one encode_batch call."""

    texts: list[str] = dataclasses.field(default_factory=list)
    piece_doc: list[int] = dataclasses.field(default_factory=list)  # document index of each piece
    doc_records: list[int] = dataclasses.field(default_factory=list)  # record number of each document
    events: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (record, skip/modification)
    chars: int = 0
    end: int = 0  # number of the record after the batch's last one


def batches(
    values: Iterable[Any], start: int, max_chars: int, long_docs: str, chat_dir: str | None = None
) -> Iterator[Batch]:
    """The documents of the values of records start, start + 1, ... in batches; each skipped
    record and each document longer than max_chars ("split" or "truncate": long_docs) is an
    event of its batch. chat_dir: the tokenizer directory whose chat template renders each
    value (a conversation); None: each value is the text itself."""
    batch = Batch(end=start)
    for record, value in enumerate(values, start):
        batch.end = record + 1
        text = _document(value, chat_dir)
        if isinstance(text, Skip):
            batch.events.append((record, text.reason))
            continue
        if len(text) > max_chars:
            if long_docs == "split":
                pieces = _pieces(text, max_chars)
                batch.events.append((record, "split"))
            else:
                pieces = [text[:max_chars]]
                batch.events.append((record, "truncated"))
        else:
            pieces = [text]
        batch.texts += pieces
        batch.piece_doc += [len(batch.doc_records)] * len(pieces)
        batch.doc_records.append(record)
        batch.chars += len(text)
        if len(batch.doc_records) >= BATCH_RECORDS or batch.chars >= BATCH_CHARS:
            yield batch
            batch = Batch(end=record + 1)
    if batch.doc_records or batch.events:
        yield batch


def encode(
    tokenizer: tokenizers.Tokenizer, texts: list[str], piece_doc: Sequence[int], eos_id: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes pieces in one batch; returns (tokens of each document + EOS, concatenated, as
    uint32) and the documents' lengths. Raises if a token id is outside the vocabulary."""
    ids = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    piece_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    doc_lengths = np.bincount(piece_doc, weights=piece_lengths).astype(np.int64) + 1
    tokens = np.empty(int(doc_lengths.sum()), dtype=np.uint32)
    is_eos = np.zeros(tokens.size, dtype=bool)
    is_eos[np.cumsum(doc_lengths) - 1] = True
    tokens[is_eos] = eos_id
    tokens[~is_eos] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(piece_lengths.sum()))
    if tokens.size and tokens.max() >= vocab_size:
        raise RuntimeError(
            f"tokenizer produced id {tokens.max()} >= its vocabulary size {vocab_size}: broken tokenizer.json"
        )
    return tokens, doc_lengths


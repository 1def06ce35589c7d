"""Distillation across tokenizers: which student and teacher positions predict the same token.

A teacher whose tokenizer differs from the student's reads the same text as other tokens, so
its position i and the student's position j can be compared only where both have read the same
text and both are asked to predict the same next token (docs/METHOD.md, "exact token
alignment"). This module finds those positions exactly:

    retokenize = TeacherRetokenizer("assets/tokenizers/gpt2", "assets/tokenizers/whisper_multilingual")
    batch = retokenize(window_ids)  # the student's [B, T + 1] windows (inputs [:, :-1], labels [:, 1:])
    teacher_logits = teacher(batch["teacher_input_ids"]).logits
    # compare student position align_student[b, k] with teacher position align_teacher[b, k]
    # where align_mask[b, k], both heads restricted by vocab_overlap(teacher_dir, student_dir)

Method. Every token id stands for an exact byte string (`ByteVocab`: byte-level BPE tokens are
decoded through GPT-2's byte alphabet, SentencePiece "▁" is a space and "<0xHH>" a byte). The
student window's bytes are cut at its EOS tokens (document boundaries); each piece is tokenized
by the teacher and the pieces are joined with the teacher's EOS, so both sequences spell the
same text, EOS counting as one byte on each side. A student token and a teacher token that
start at the same byte and have identical bytes are the same next token after the same text:
the positions just before them (student j, teacher i) are aligned. That is the whole rule;
`byte_span_alignment` applies it to token byte strings and `TeacherRetokenizer` to id batches.
It costs a sorted merge of the two sequences' start offsets, linear in practice.

Guarantees, for every aligned pair (i, j) of `TeacherRetokenizer`: the text of student tokens
0..j equals the text of teacher tokens 0..i, student token j + 1 and teacher token i + 1 have
identical bytes, and that token is in `vocab_overlap` (so the student's label is a class of
both restricted heads). Every pair with these properties is found (with `max_len`, every pair
whose teacher position is below it).

Why byte offsets, not DSKD's marker-stripped strings (`exact_token_alignment`, kept as the
reference): stripping "Ġ"/"▁" forgets where spaces are, so "Ġ" + "Ġb" and "ĠĠ" + "b" both
read "", "b" and get paired although they differ. GPT-2 and Whisper merge no runs of spaces,
so on their tokens both methods agree; a vocabulary that does (SentencePiece, most newer BPEs)
gets wrong pairs such as "ĊĊĠĠ" with "ĊĊ" (tests/test_align.py). Character offsets from the
fast tokenizers are no better: tokens that split a character (an emoji's four bytes over three
tokens) all get the whole character's span. Bytes are exact in both cases.

Windows start and end at arbitrary tokens: a character cut by the window's edge leaves bytes
that are not UTF-8. The teacher receives them as its single-byte tokens, so the text stays
identical; they rarely align. Student special tokens other than EOS reach the teacher as their
literal text and never align. The teacher's tokenizer must spell its input exactly (no
normalizer, no added prefix space), as byte-level BPE tokenizers do (GPT-2, Llama 3, Qwen);
`TeacherRetokenizer` checks this when built.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch

from lrc_dist.tokenizer_files import find_eos, load_tokenizer

MARKERS = ("▁", "Ġ")  # word-boundary markers of SentencePiece and GPT-2 token strings
_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_NOT_UTF8 = re.compile("([\udc80-\udcff]+)")  # bytes that "surrogateescape" could not decode
# Text whose tokens must spell it back exactly: spaces, tabs, newlines, accents, CJK, emoji;
# it starts with a letter so that a tokenizer adding a prefix space fails.
_ROUND_TRIP_PROBE = "Hello  world.\n\tIndented:  naïve café, 中文字符, 😀🤗 done.  \n "


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _has_type(node: Any, name: str) -> bool:
    """Whether a tokenizer.json component (or one nested in a Sequence) has "type": name."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    return isinstance(node, list) and any(_has_type(v, name) for v in node)


@dataclasses.dataclass
class ByteVocab:
    """A tokenizer and the exact bytes each of its ids stands for."""

    path: Path
    tokenizer: tokenizers.Tokenizer
    pieces: list[bytes]  # id -> bytes; a special token -> its content
    special: frozenset[int]  # special tokens (and ids with no token): markup, never text
    eos_id: int

    @classmethod
    def load(cls, tokenizer_dir: str | Path, eos_token: str | None = None) -> ByteVocab:
        """Loads DIR/tokenizer.json; EOS is `eos_token` or tokenizer_config.json's eos_token."""
        path = Path(tokenizer_dir)
        tokenizer = load_tokenizer(path)
        _, eos_id = find_eos(path, tokenizer, eos_token)
        spec = json.loads(tokenizer.to_str())
        byte_level = _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")
        byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
        alphabet = _byte_level_alphabet()
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        pieces, special = [], set()
        for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
            token = tokenizer.id_to_token(i)
            if token is None or added.get(i, {}).get("special"):
                special.add(i)
                pieces.append((token or "").encode())
            elif i in added:  # added tokens match raw text: their content is not byte-level encoded
                pieces.append(token.encode())
            elif byte_level:
                if not set(token) <= alphabet.keys():
                    raise ValueError(
                        f"{path / 'tokenizer.json'}: token {token!r} (id {i}) is not written in the byte-level "
                        "alphabet its (pre-)tokenizer uses: the file is inconsistent; re-save it with transformers"
                    )
                pieces.append(bytes(alphabet[c] for c in token))
            elif byte_fallback and _SENTENCEPIECE_BYTE.fullmatch(token):
                pieces.append(bytes([int(token[3:5], 16)]))
            else:
                pieces.append(token.replace("▁", " ").encode())
        return cls(path, tokenizer, pieces, frozenset(special), eos_id)


def _vocab(tokenizer: str | Path | ByteVocab) -> ByteVocab:
    return tokenizer if isinstance(tokenizer, ByteVocab) else ByteVocab.load(tokenizer)


def exact_token_alignment(
    teacher_tokens: Sequence[str], student_tokens: Sequence[str], eos: str | tuple[str, str] = "<|endoftext|>"
) -> list[tuple[int, int]]:
    """DSKD's exact token alignment on token strings: pairs (i, j) of teacher token i and
    student token j that are the same token after the same text.

    Markers ("▁", "Ġ") are stripped; two pointers walk the sequences keeping the text read so
    far on each side. "The next token" of a side is the one right after its accumulated text
    (token i itself, not i + 1): the DSKD paper's example (docs/METHOD.md) aligns teacher "my" (0) with student "my" (0)
    although "boy" != "boyfri" follow, and "good" (7, 5) although "peop" != "people" follow.
    A pair is recorded when the accumulated texts are equal and the next tokens are equal (or
    both EOS); then the side with the shorter text reads its next token, both sides on equal
    lengths. EOS adds "\\0" to both texts. `eos`: one EOS string, or (teacher's, student's).

    The model position that predicts token i is i - 1. This is the reference method: stripping
    markers can pair different tokens ("Ġ" + "Ġb" vs "ĠĠ" + "b"); `byte_span_alignment` can't.
    """
    teacher_eos, student_eos = (eos, eos) if isinstance(eos, str) else eos

    def strip(tokens: Sequence[str], eos_token: str) -> list[str]:
        return ["\0" if t == eos_token else t.replace(MARKERS[0], "").replace(MARKERS[1], "") for t in tokens]

    t, s = strip(teacher_tokens, teacher_eos), strip(student_tokens, student_eos)
    pairs, i, j, t_text, s_text = [], 0, 0, "", ""
    while i < len(t) and j < len(s):
        if t_text == s_text and t[i] == s[j]:  # both EOS: both "\0"
            pairs.append((i, j))
        t_behind, s_behind = len(t_text) <= len(s_text), len(s_text) <= len(t_text)
        if t_behind:
            t_text, i = t_text + t[i], i + 1
        if s_behind:
            s_text, j = s_text + s[j], j + 1
    return pairs


def _same_start(teacher_lengths: np.ndarray, student_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of the teacher and student tokens that start at the same byte of their
    common text, given every token's length in bytes (a sorted merge of the start offsets)."""
    _, i, j = np.intersect1d(
        np.cumsum(teacher_lengths) - teacher_lengths, np.cumsum(student_lengths) - student_lengths, return_indices=True
    )
    return i, j


def byte_span_alignment(
    teacher_pieces: Sequence[bytes | None], student_pieces: Sequence[bytes | None]
) -> list[tuple[int, int]]:
    """Exact token alignment by byte offsets: pairs (i, j) of teacher token i and student token j
    that start at the same byte (the same text precedes them) and have identical bytes. Same
    convention as `exact_token_alignment`; pieces are token bytes, None for EOS (one byte).

    This is the set of all correct pairs: whitespace and split characters are compared as they
    are, nothing is stripped. Raises ValueError when the two sides spell different texts.
    """

    def spelled(pieces: Sequence[bytes | None]) -> list[bytes]:
        return [b"\xff" if p is None else p for p in pieces]  # 0xFF never occurs in UTF-8 text

    t, s = spelled(teacher_pieces), spelled(student_pieces)
    if b"".join(t) != b"".join(s):
        raise ValueError("teacher and student tokens spell different texts: tokenize the same text on both sides")
    i, j = _same_start(np.array([len(p) for p in t], dtype=np.int64), np.array([len(p) for p in s], dtype=np.int64))
    return [(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if teacher_pieces[a] == student_pieces[b]]


def _student_to_teacher(teacher: ByteVocab, student: ByteVocab) -> np.ndarray:
    """For each student id, the teacher id with identical bytes, or -1. Special tokens match
    nothing but EOS matches EOS; of tokens with the same bytes only the lowest id counts."""
    teacher_ids: dict[bytes, int] = {}
    for i, piece in enumerate(teacher.pieces):
        if i not in teacher.special and piece:
            teacher_ids.setdefault(piece, i)
    mapping = np.full(len(student.pieces), -1, dtype=np.int64)
    seen: set[bytes] = set()
    for j, piece in enumerate(student.pieces):
        if j not in student.special and piece in teacher_ids and piece not in seen:
            mapping[j] = teacher_ids[piece]
            seen.add(piece)
    mapping[student.eos_id] = teacher.eos_id
    return mapping


def vocab_overlap(
    teacher_tokenizer: str | Path | ByteVocab, student_tokenizer: str | Path | ByteVocab
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher_ids, student_ids): the tokens with identical bytes in both vocabularies, plus
    EOS -> EOS, sorted by student id, one to one. Restrict both heads to them with
    logits[..., ids]. Arguments: tokenizer directories or loaded `ByteVocab`s."""
    mapping = _student_to_teacher(_vocab(teacher_tokenizer), _vocab(student_tokenizer))
    student_ids = np.flatnonzero(mapping >= 0)
    return torch.from_numpy(mapping[student_ids]), torch.from_numpy(student_ids)


class TeacherRetokenizer:
    """Turns the student's windows into the teacher's input and the aligned positions.

    `__call__(window_ids)` takes a LongTensor [B, T + 1] of student ids (input_ids = [:, :-1],
    labels = [:, 1:]) and returns:

    - teacher_input_ids [B, T_t]: the teacher's tokens of each window's text but the last (as
      the student's input_ids), right-padded with teacher EOS; T_t is the longest row, at most
      `max_len`. teacher_labels [B, T_t]: the next teacher token, -100 on padding.
    - align_student, align_teacher [B, K] and align_mask [B, K] (False on padding): student
      position align_student[b, k] and teacher position align_teacher[b, k] have read the same
      text and predict the same token (see the module doc); K is the most pairs of a row.
    - aligned_ratio: aligned pairs / student positions (B * T), a float.
    - clone_student, clone_teacher, clone_mask [B, K']: the positions that have read the same
      text, whatever token follows (both tokens' spans end at the same byte): where LRC across
      tokenizers compares the two models' activations. A superset of the aligned pairs.
    """

    def __init__(
        self,
        student_tokenizer: str | Path | ByteVocab,
        teacher_tokenizer: str | Path | ByteVocab,
        max_len: int | None = None,
    ):
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be None or positive, got {max_len}")
        self.student, self.teacher = _vocab(student_tokenizer), _vocab(teacher_tokenizer)
        self.max_len = max_len
        # A literal "<|endoftext|>" in a document is text to the student: it must not become
        # the teacher's EOS (a fake document boundary).
        self.teacher.tokenizer.encode_special_tokens = True
        probe = self.teacher.tokenizer.encode(_ROUND_TRIP_PROBE, add_special_tokens=False).ids
        spelled = b"".join(self.teacher.pieces[t] for t in probe)
        if spelled != _ROUND_TRIP_PROBE.encode():
            raise ValueError(
                f"the teacher tokenizer {self.teacher.path} changes the text it encodes ({_ROUND_TRIP_PROBE!r} "
                f"-> {spelled!r}: a normalizer or an added prefix space), so its tokens can't be aligned by "
                "bytes; exact alignment needs a teacher whose tokens spell their input, e.g. byte-level BPE"
            )
        self.student_to_teacher = _student_to_teacher(self.teacher, self.student)
        # Token lengths in bytes for the offsets; EOS counts as one byte on both sides.
        self.student_lengths = np.array([len(p) for p in self.student.pieces], dtype=np.int64)
        self.teacher_lengths = np.array([len(p) for p in self.teacher.pieces], dtype=np.int64)
        self.student_lengths[self.student.eos_id] = self.teacher_lengths[self.teacher.eos_id] = 1
        # The teacher's single-byte tokens, for bytes of characters cut by a window's edge.
        single = {p: i for i, p in enumerate(self.teacher.pieces) if len(p) == 1 and i not in self.teacher.special}
        missing = [f"0x{b:02X}" for b in range(0x80, 0x100) if bytes([b]) not in single]
        if missing:
            raise ValueError(
                f"the teacher tokenizer {self.teacher.path} has no single-byte tokens for {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''}: windows that cut a UTF-8 character can't be given to it; "
                "use a byte-level BPE or a byte-fallback tokenizer"
            )
        self.byte_tokens = [single.get(bytes([b]), -1) for b in range(256)]

    def _spelling(self, text: bytes) -> list[str | list[int]]:
        """Bytes as UTF-8 text runs for the teacher to encode and its single-byte tokens for the
        bytes that are not UTF-8 (characters cut by a window's edge)."""
        parts: list[str | list[int]] = []
        for k, run in enumerate(_NOT_UTF8.split(text.decode("utf-8", "surrogateescape"))):
            if k % 2:  # escaped bytes 0x80-0xFF
                parts.append([self.byte_tokens[ord(c) - 0xDC00] for c in run])
            elif run:
                parts.append(run)
        return parts

    def encode(self, plans: list[list[str | list[int]]]) -> list[np.ndarray]:
        """The teacher's ids of each plan (text runs encoded in one batch, ids kept as they are)."""
        texts = [part for plan in plans for part in plan if isinstance(part, str)]
        encoded = iter(self.teacher.tokenizer.encode_batch_fast(texts, add_special_tokens=False))
        return [np.array([t for part in plan for t in (next(encoded).ids if isinstance(part, str) else part)],
                         np.int64) for plan in plans]

    def spell(self, pieces: Sequence[bytes]) -> list[np.ndarray]:
        """The teacher's ids that spell each byte string (e.g. a student token's bytes)."""
        return self.encode([self._spelling(p) for p in pieces])

    def _teacher_parts(self, window: np.ndarray) -> list[str | list[int]]:
        """A window as text for the teacher to encode and teacher ids to insert as they are: EOS
        at the student's EOS, single-byte tokens for bytes that are not UTF-8."""
        pieces, student_ids, parts, start = self.student.pieces, window.tolist(), [], 0
        for end in [*np.flatnonzero(window == self.student.eos_id).tolist(), len(student_ids)]:
            parts += self._spelling(b"".join([pieces[t] for t in student_ids[start:end]]))
            if end < len(student_ids):
                parts.append([self.teacher.eos_id])
            start = end + 1
        return parts

    def __call__(self, window_ids: torch.Tensor) -> dict[str, Any]:
        if window_ids.dim() != 2 or window_ids.shape[1] < 2:
            raise ValueError(
                f"window_ids must be [B, T + 1] student ids with T >= 1, got shape {list(window_ids.shape)}"
            )
        windows = window_ids.cpu().numpy().astype(np.int64)
        teacher_rows = self.encode([self._teacher_parts(row) for row in windows])

        batch, seq_len = windows.shape[0], windows.shape[1] - 1
        width = max(len(t) - 1 for t in teacher_rows)
        width = width if self.max_len is None else min(width, self.max_len)
        teacher_input = np.full((batch, width), self.teacher.eos_id, dtype=np.int64)
        teacher_labels = np.full((batch, width), -100, dtype=np.int64)
        pairs, clone_pairs = [], []
        for b, (student, teacher) in enumerate(zip(windows, teacher_rows, strict=True)):
            n = min(len(teacher) - 1, width)
            teacher_input[b, :n], teacher_labels[b, :n] = teacher[:n], teacher[1 : n + 1]
            t_lengths, s_lengths = self.teacher_lengths[teacher], self.student_lengths[student]
            if t_lengths.sum() != s_lengths.sum():  # the offsets assume it; the probe checked it once
                raise RuntimeError(f"the teacher's tokens of window {b} don't spell its text ({self.teacher.path})")
            i, j = _same_start(t_lengths, s_lengths)
            # Token pair (i, j) is predicted at positions (i - 1, j - 1); the teacher's must be an input.
            keep = (self.student_to_teacher[student[j]] == teacher[i]) & (i > 0) & (j > 0) & (i <= width)
            pairs.append((i[keep] - 1, j[keep] - 1))
            # Input positions whose tokens end at the same byte: both have read the same text.
            _, i, j = np.intersect1d(np.cumsum(t_lengths)[:n], np.cumsum(s_lengths)[:seq_len], return_indices=True)
            clone_pairs.append((i, j))

        align_teacher, align_student, align_mask = _padded(pairs)
        clone_teacher, clone_student, clone_mask = _padded(clone_pairs)
        return {
            "teacher_input_ids": torch.from_numpy(teacher_input),
            "teacher_labels": torch.from_numpy(teacher_labels),
            "align_student": align_student,
            "align_teacher": align_teacher,
            "align_mask": align_mask,
            "aligned_ratio": sum(len(i) for i, _ in pairs) / (batch * seq_len),
            "clone_student": clone_student,
            "clone_teacher": clone_teacher,
            "clone_mask": clone_mask,
        }


def _padded(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row position pairs as (teacher positions, student positions, mask) [B, most pairs of a row]."""
    k = max(len(i) for i, _ in pairs)
    teacher, student = torch.zeros(len(pairs), k, dtype=torch.long), torch.zeros(len(pairs), k, dtype=torch.long)
    mask = torch.zeros(len(pairs), k, dtype=torch.bool)
    for b, (i, j) in enumerate(pairs):
        teacher[b, : len(i)], student[b, : len(j)] = torch.from_numpy(i), torch.from_numpy(j)
        mask[b, : len(i)] = True
    return teacher, student, mask

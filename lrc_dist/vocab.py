"""LRC across tokenizers: the student's own vocabulary, generated from the teacher's.

An LRC student inherits the teacher's embedding and head through a projection, E_S = E_T @ P.
With a tokenizer of its own (`model.student` names its directory) the student has other tokens,
so each of its tokens first gets a row in the teacher's space (d_T), fixed and derived from the
teacher's rows, and the student's embedding and head are those rows times the trained projections:

    E_S = B_embed @ P_embed,  H_S = B_head @ P_head  ([V_S, d_T] @ [d_T, d_S])

The rows (`StudentVocab.embedding_rows`, `head_rows`) follow one rule per kind of token:

- a token whose bytes are a teacher token (`align.vocab_overlap`; EOS is EOS): that token's row,
  in both B_embed and B_head. The student then starts as exactly the paper's LRC on the tokens
  the two vocabularies share;
- another ordinary token: the teacher's tokens that spell its bytes (`TeacherRetokenizer.spell`).
  Its embedding row is their mean (the usual rule for a new token's input embedding, as in
  vocabulary transfer methods); its head row is the first one's: predicting the student's token
  means predicting the text it starts with, which the teacher predicts with its first piece;
- a special token (markup, never text): the teacher's row of the special token with the same
  content (e.g. `<|im_start|>` between two Qwen-family tokenizers), else the mean of the teacher's
  ordinary rows (its real tokens: not its specials, nor the padding rows past its tokenizer).

A tied teacher has one matrix for both, so the student's head rows are its embedding rows (the
mean rule), as its tied export must have them.

The rows are derived, never trained or checkpointed: the model is rebuilt from the teacher and the
two tokenizers. Only the projections train, as in LRC; the dense phase (`lrc.dense_after`) frees
every row of the student's embedding and head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lrc_dist.align import ByteVocab, TeacherRetokenizer


@dataclasses.dataclass
class StudentVocab:
    """The student's vocabulary and how its rows come from the teacher's (module doc)."""

    tokenizer_dir: Path
    size: int  # V_S: the student's ids, with its added tokens
    teacher_ids: Tensor  # the shared tokens (align.vocab_overlap): teacher id ...
    student_ids: Tensor  # ... and student id, by student id
    spelling: Tensor  # the teacher ids spelling each student token, flat ...
    offsets: Tensor  # ... from offsets[j]; a token with none (an unmatched special one) has an empty run
    eos_id: int
    bos_id: int | None
    teacher_tokens: int  # the teacher tokenizer's ids (rows past them are padding) ...
    teacher_specials: Tensor  # ... and its special ones: the rest are the rows an unmatched special token averages

    @classmethod
    def load(cls, teacher_dir: str | Path, student_dir: str | Path) -> StudentVocab:
        """From the two checkpoint/tokenizer directories (their tokenizer.json files)."""
        student, teacher = ByteVocab.load(student_dir), ByteVocab.load(teacher_dir)
        retokenize = TeacherRetokenizer(student, teacher)
        mapping = retokenize.student_to_teacher
        ordinary = [j for j in range(len(student.pieces)) if mapping[j] < 0 and j not in student.special]
        spelled = dict(zip(ordinary, retokenize.spell([student.pieces[j] for j in ordinary]), strict=True))
        teacher_specials = {teacher.pieces[i]: i for i in sorted(teacher.special) if teacher.pieces[i]}
        spelled.update({j: [teacher_specials[student.pieces[j]]] for j in student.special
                        if mapping[j] < 0 and student.pieces[j] in teacher_specials})
        runs = [[int(mapping[j])] if mapping[j] >= 0 else spelled.get(j, []) for j in range(len(student.pieces))]
        lengths = torch.tensor([len(r) for r in runs])
        shared = torch.from_numpy(mapping >= 0).nonzero().flatten()
        return cls(Path(student_dir), len(runs), torch.from_numpy(mapping)[shared], shared,
                   torch.tensor([t for r in runs for t in r], dtype=torch.long),
                   torch.cumsum(lengths, 0) - lengths, student.eos_id, _bos_id(Path(student_dir), student),
                   len(teacher.pieces), torch.tensor(sorted(teacher.special), dtype=torch.long))

    @torch.no_grad()
    def embedding_rows(self, teacher_embedding: Tensor) -> Tensor:
        """B_embed [V_S, d_T]: the mean of the spelling's rows (module doc), in the weight's dtype
        and on its device."""
        spelling, offsets = self.spelling.to(teacher_embedding.device), self.offsets.to(teacher_embedding.device)
        rows = F.embedding_bag(spelling, teacher_embedding, offsets, mode="mean")
        return self._fill_specials(rows, teacher_embedding)

    @torch.no_grad()
    def head_rows(self, teacher_head: Tensor) -> Tensor:
        """B_head [V_S, d_T]: the first spelling token's row (module doc)."""
        first = self.spelling[self.offsets.clamp(max=len(self.spelling) - 1)]
        return self._fill_specials(teacher_head[first.to(teacher_head.device)], teacher_head)

    def _fill_specials(self, rows: Tensor, teacher: Tensor) -> Tensor:
        """The tokens with no spelling take the mean of the teacher's ordinary rows (fp32 sums)."""
        empty = torch.diff(self.offsets, append=torch.tensor([len(self.spelling)])) == 0
        if empty.any():  # sums, not an fp32 copy of the table (2 GiB at 7B)
            specials = teacher[self.teacher_specials.to(teacher.device)].sum(0, dtype=torch.float32)
            total = teacher[: self.teacher_tokens].sum(0, dtype=torch.float32) - specials
            rows[empty.to(rows.device)] = (total / (self.teacher_tokens - len(self.teacher_specials))).to(rows.dtype)
        return rows


def _bos_id(path: Path, vocab: ByteVocab) -> int | None:
    """The student tokenizer's BOS id (tokenizer_config.json's bos_token), or None."""
    file = path / "tokenizer_config.json"
    token = json.loads(file.read_text()).get("bos_token") if file.is_file() else None
    token = token.get("content") if isinstance(token, dict) else token
    return vocab.tokenizer.token_to_id(token) if token else None

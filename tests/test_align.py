"""lrc_dist.align: DSKD's string alignment on its example, byte-offset alignment against a brute-force
reference (correct and complete) on real tokenizers, the vocabulary overlap, and the teacher
retokenizer on random windows of English and multilingual text, cut at arbitrary tokens."""

import json
import random
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import build_tokenizer
from lrc_dist.align import (
    ByteVocab,
    TeacherRetokenizer,
    byte_span_alignment,
    exact_token_alignment,
    vocab_overlap,
)
from lrc_dist.demo import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "assets" / "tokenizers" / "gpt2"
WHISPER = ROOT / "assets" / "tokenizers" / "whisper_multilingual"
ENGLISH = sorted(pydoc_data.topics.topics.values())
MULTILINGUAL = [
    "Ça va très bien, merci ! L'été dernier, nous sommes allés à la plage près de Nîmes.",
    "Größere Änderungen übernehmen wir später; die Straße ist gesperrt.",
    "El niño comió piña y jamón en la mañana del miércoles.",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "東京は日本の首都です。今日はとても良い天気ですね。",
    "我们明天早上九点在图书馆见面，好吗？这个问题很难。",
    "한국어 문장도 잘 처리되어야 합니다. 감사합니다!",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "Emoji: 😀🤗👍🏽 👨‍👩‍👧‍👦 🇫🇷 — done.  Tabs\tand  double  spaces.\n\n    indented line",
]


def documents(texts: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(texts) for _ in range(rng.randint(1, 6))) for _ in range(count)]


def token_stream(vocab: ByteVocab, docs: list[str]) -> list[int]:
    """Documents tokenized as data_prep/tokenize.py does: special-token text stays text, EOS after each."""
    vocab.tokenizer.encode_special_tokens = True
    return [t for e in vocab.tokenizer.encode_batch(docs, add_special_tokens=False) for t in e.ids + [vocab.eos_id]]


def spell(vocab: ByteVocab, ids) -> list[bytes]:
    """Each token's bytes; EOS as 0xFF, a byte UTF-8 text never holds."""
    return [b"\xff" if t == vocab.eos_id else vocab.pieces[t] for t in ids]


def reference_pairs(teacher: list[bytes], student: list[bytes], teacher_inputs: int) -> set[tuple[int, int]]:
    """Every (i, j), i < teacher_inputs: teacher tokens 0..i and student tokens 0..j spell the same
    text, and tokens i + 1 and j + 1 are identical. A dict of prefix lengths, no merging."""
    ends, offset = {}, 0
    for i, piece in enumerate(teacher[: min(teacher_inputs, len(teacher) - 1)]):
        offset += len(piece)
        ends[offset] = i
    pairs, offset = set(), 0
    for j, piece in enumerate(student[:-1]):
        offset += len(piece)
        i = ends.get(offset)
        if i is not None and teacher[i + 1] == student[j + 1]:
            pairs.add((i, j))
    return pairs


def token_pairs_are_correct(teacher: list[bytes], student: list[bytes], pairs) -> list[bool]:
    """Per token pair (i, j): same text before, identical tokens."""
    t_text, s_text = b"".join(teacher), b"".join(student)
    t_start, s_start = np.cumsum([0] + [len(p) for p in teacher]), np.cumsum([0] + [len(p) for p in student])
    return [t_text[: t_start[i]] == s_text[: s_start[j]] and teacher[i] == student[j] for i, j in pairs]


@pytest.fixture(scope="module")
def gpt2():
    return ByteVocab.load(GPT2)


@pytest.fixture(scope="module")
def whisper():
    return ByteVocab.load(WHISPER)


@pytest.fixture(scope="module")
def spaces_bpe(tmp_path_factory):
    """A real byte-level BPE trained on Python's docs: unlike GPT-2 and Whisper it merges runs of
    whitespace ("ĊĊĠĠ", "ĠĠĠĠ"), as SentencePiece and newer BPE vocabularies do."""
    path = tmp_path_factory.mktemp("spaces_bpe")
    write_jsonl(path / "corpus.jsonl", ENGLISH)
    build_tokenizer(path, path / "corpus.jsonl", 1000)
    vocab = ByteVocab.load(path)
    assert vocab.tokenizer.token_to_id("ĠĠĠĠ") is not None
    return vocab


# ---------------------------------------------------------------- DSKD's string alignment


def test_eta_reproduces_the_dskd_example():
    teacher = ["my", "boy", "fr", "ie", "nd", "is", "a", "good", "peop", "le", "!", "<|endoftext|>"]
    student = ["my", "boyfri", "end", "is", "a", "good", "people", "!", "<|endoftext|>"]
    expected = list(zip([0, 5, 6, 7, 10, 11], [0, 3, 4, 5, 7, 8], strict=True))
    assert exact_token_alignment(teacher, student) == expected
    # The same with markers of both conventions and different EOS strings.
    teacher = ["▁my", "▁boy", "fr", "ie", "nd", "▁is", "▁a", "▁good", "▁peop", "le", "!", "</s>"]
    student = ["my", "Ġboyfri", "end", "Ġis", "Ġa", "Ġgood", "Ġpeople", "!", "<|endoftext|>"]
    assert exact_token_alignment(teacher, student, eos=("</s>", "<|endoftext|>")) == expected


def test_byte_span_alignment_equals_eta_on_the_dskd_example():
    teacher = [b"my", b" boy", b"fr", b"ie", b"nd", b" is", b" a", b" good", b" peop", b"le", b"!", None]
    student = [b"my", b" boyfri", b"end", b" is", b" a", b" good", b" people", b"!", None]
    assert byte_span_alignment(teacher, student) == list(zip([0, 5, 6, 7, 10, 11], [0, 3, 4, 5, 7, 8], strict=True))
    with pytest.raises(ValueError, match="different texts"):
        byte_span_alignment(teacher, student[:-2] + [b"?", None])


def test_marker_stripping_pairs_different_tokens():
    # "a  b": "Ġ" + "Ġb" against "ĠĠ" + "b". Stripped, both read "a", "", "b".
    teacher, student = ["a", "Ġ", "Ġb"], ["a", "ĠĠ", "b"]
    teacher_bytes, student_bytes = [b"a", b" ", b" b"], [b"a", b"  ", b"b"]
    eta = exact_token_alignment(teacher, student)
    assert eta == [(0, 0), (1, 1), (2, 2)]
    assert token_pairs_are_correct(teacher_bytes, student_bytes, eta) == [True, False, False]
    assert byte_span_alignment(teacher_bytes, student_bytes) == [(0, 0)]


def alignments_on(teacher: ByteVocab, student: ByteVocab, text: str):
    t_ids = teacher.tokenizer.encode(text, add_special_tokens=False).ids
    s_ids = student.tokenizer.encode(text, add_special_tokens=False).ids
    t_bytes, s_bytes = spell(teacher, t_ids), spell(student, s_ids)
    eta = exact_token_alignment([teacher.tokenizer.id_to_token(t) for t in t_ids],
                                [student.tokenizer.id_to_token(s) for s in s_ids])
    spans = byte_span_alignment(t_bytes, s_bytes)
    # Token pairs (i, j) are position pairs (i - 1, j - 1) of the reference; its first tokens pair as (0, 0).
    reference = {(i + 1, j + 1) for i, j in reference_pairs(t_bytes, s_bytes, len(t_bytes))}
    reference |= {(0, 0)} if t_bytes[0] == s_bytes[0] else set()
    correct = token_pairs_are_correct(t_bytes, s_bytes, eta)
    return eta, spans, reference, correct


def test_byte_spans_find_exactly_the_correct_pairs_on_real_text(gpt2, whisper, spaces_bpe):
    totals = {"eta": 0, "eta_wrong": 0, "spans": 0}
    for text in ENGLISH[:30] + MULTILINGUAL:
        for teacher, student in [(whisper, gpt2), (spaces_bpe, gpt2)]:
            eta, spans, reference, correct = alignments_on(teacher, student, text)
            assert set(spans) == reference  # correct and complete
            assert {p for p, ok in zip(eta, correct, strict=True) if ok} <= set(spans)
            if teacher is whisper:  # same pre-tokenizer, no whitespace merges: ETA is exact here
                assert eta == spans
            else:
                totals["eta"] += len(eta)
                totals["eta_wrong"] += correct.count(False)
                totals["spans"] += len(spans)
    # With whitespace merged differently, stripped markers pair "ĊĊĠĠ" with "ĊĊ", and so on.
    assert totals["eta_wrong"] > 0.01 * totals["eta"]


# ---------------------------------------------------------------- vocabularies


def test_byte_vocab_agrees_with_the_tokenizer_decoder(gpt2, whisper):
    for vocab in (gpt2, whisper):
        text = " ".join(MULTILINGUAL)
        ids = vocab.tokenizer.encode(text, add_special_tokens=False).ids
        assert b"".join(vocab.pieces[t] for t in ids) == text.encode()
        utf8 = [i for i, p in enumerate(vocab.pieces) if i not in vocab.special and _is_utf8(p)]
        assert len(utf8) > 0.9 * len(vocab.pieces)
        decoded = vocab.tokenizer.decode_batch([[i] for i in utf8], skip_special_tokens=False)
        assert decoded == [vocab.pieces[i].decode() for i in utf8]
    assert (gpt2.eos_id, whisper.eos_id) == (50256, 50257)
    assert gpt2.special == {50256} and gpt2.pieces[50256] == b"<|endoftext|>"


def _is_utf8(piece: bytes) -> bool:
    try:
        piece.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_vocab_overlap_of_real_vocabularies(gpt2, whisper):
    teacher_ids, student_ids = vocab_overlap(WHISPER, GPT2)
    assert teacher_ids.dtype == student_ids.dtype == torch.long
    assert torch.all(student_ids[1:] > student_ids[:-1]) and len(set(teacher_ids.tolist())) == len(teacher_ids)
    pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist(), strict=True))
    assert pairs.pop(gpt2.eos_id) == whisper.eos_id
    assert all(gpt2.pieces[s] == whisper.pieces[t] for s, t in pairs.items())
    assert pairs[gpt2.tokenizer.token_to_id("Ġthe")] == whisper.tokenizer.token_to_id("Ġthe")
    # Complete: every non-special GPT-2 token whose bytes Whisper has is in the overlap.
    whisper_bytes = {p for i, p in enumerate(whisper.pieces) if i not in whisper.special}
    assert len(pairs) == sum(gpt2.pieces[s] in whisper_bytes for s in range(len(gpt2.pieces)) if s not in gpt2.special)
    assert len(pairs) > 25_000


def write_sentencepiece_tokenizer(path: Path) -> None:
    """A SentencePiece-style (Llama 2) tokenizer: "▁" for spaces, "<0xHH>" byte fallback, a prefix space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    merges = [("▁", "h"), ("▁h", "e"), ("▁he", "l"), ("▁hel", "l"), ("▁hell", "o"),
              ("▁", "w"), ("▁w", "o"), ("▁wo", "r"), ("▁wor", "l"), ("▁worl", "d")]
    for token in ["▁", "h", "e", "l", "o", "w", "r", "d"] + [a + b for a, b in merges]:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def test_sentencepiece_vocabulary_as_bytes(tmp_path, gpt2):
    write_sentencepiece_tokenizer(tmp_path / "sp")
    sp = ByteVocab.load(tmp_path / "sp")
    token = sp.tokenizer.token_to_id
    assert sp.eos_id == 2 and sp.special == {0, 1, 2}
    assert sp.pieces[token("▁hello")] == b" hello" and sp.pieces[token("<0x0A>")] == b"\n"
    teacher_ids, student_ids = vocab_overlap(gpt2, sp)
    pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist(), strict=True))
    assert pairs[token("▁hello")] == gpt2.tokenizer.token_to_id("Ġhello") and pairs[2] == gpt2.eos_id
    assert pairs[token("<0x0A>")] == gpt2.tokenizer.token_to_id("Ċ")

    # As the student it works: its tokens spell " hello world" (prefix space included).
    hello, world = token("▁hello"), token("▁world")
    out = TeacherRetokenizer(sp, gpt2)(torch.tensor([[hello, world, 2, hello]]))
    assert out["teacher_input_ids"].tolist() == [[gpt2.tokenizer.token_to_id(t) for t in ["Ġhello", "Ġworld"]]
                                                 + [gpt2.eos_id]]
    assert out["align_student"].tolist() == out["align_teacher"].tolist() == [[0, 1, 2]]
    # As the teacher it can't: it adds a space to the text it is given.
    with pytest.raises(ValueError, match="changes the text"):
        TeacherRetokenizer(gpt2, sp)


def test_tokenizer_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ByteVocab.load(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vocab_overlap(tmp_path / "missing", GPT2)


# ---------------------------------------------------------------- the teacher retokenizer


def check_batch(retokenize: TeacherRetokenizer, windows: torch.Tensor, max_len: int | None = None) -> float:
    """Checks every guarantee of one retokenized batch against the reference; returns the ratio."""
    out = retokenize(windows)
    teacher, student = retokenize.teacher, retokenize.student
    inputs, labels = out["teacher_input_ids"], out["teacher_labels"]
    overlap = dict(zip(*[ids.tolist() for ids in reversed(vocab_overlap(teacher, student))], strict=True))
    assert inputs.shape == labels.shape and (max_len is None or inputs.shape[1] <= max_len)
    found = 0
    for b, window in enumerate(windows.tolist()):
        n = int((labels[b] != -100).sum())
        assert torch.all(inputs[b, n:] == teacher.eos_id) and torch.equal(inputs[b, 1:n], labels[b, : n - 1])
        t_full = inputs[b, :n].tolist() + labels[b, n - 1 : n].tolist()
        t_bytes, s_bytes = spell(teacher, t_full), spell(student, window)
        if max_len is None or n < max_len:  # not cut: the teacher reads exactly the window's text
            assert b"".join(t_bytes) == b"".join(s_bytes)
        mask = out["align_mask"][b]
        assert not torch.any(mask[int(mask.sum()) :])  # padding only at the end
        pairs = list(zip(out["align_teacher"][b][mask].tolist(), out["align_student"][b][mask].tolist(), strict=True))
        for i, j in pairs:  # the guarantees, pair by pair
            assert b"".join(t_bytes[: i + 1]) == b"".join(s_bytes[: j + 1])
            assert t_bytes[i + 1] == s_bytes[j + 1] and labels[b, i] == t_full[i + 1]
            assert overlap[window[j + 1]] == t_full[i + 1]
        assert set(pairs) == reference_pairs(t_bytes, s_bytes, n) and len(set(pairs)) == len(pairs)
        found += len(pairs)
    ratio = found / (windows.shape[0] * (windows.shape[1] - 1))
    assert out["aligned_ratio"] == pytest.approx(ratio)
    return ratio


def random_windows(stream: list[int], batch: int, length: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - length, size=batch)
    return torch.tensor([stream[s : s + length] for s in starts])


# Lowest aligned ratios accepted (English, multilingual). GPT-2 spends a token per byte on many
# non-Latin characters that Whisper reads whole; spaces_bpe has only 1,000 tokens.
@pytest.mark.parametrize(
    "pair, least", [("gpt2->whisper", (0.8, 0.2)), ("whisper->gpt2", (0.8, 0.4)), ("gpt2->spaces_bpe", (0.4, 0.4))]
)
def test_retokenizer_pairs_are_correct_and_complete(pair, least, request):
    student, teacher = (request.getfixturevalue(name) for name in pair.split("->"))
    retokenize = TeacherRetokenizer(student, teacher)
    english = token_stream(student, documents(ENGLISH, 40, seed=1))
    multilingual = token_stream(student, documents(MULTILINGUAL, 100, seed=2))
    english_ratio = check_batch(retokenize, random_windows(english, 4, 257, seed=3))
    multilingual_ratio = check_batch(retokenize, random_windows(multilingual, 4, 257, seed=4))
    print(f"{pair}: aligned ratio English {english_ratio:.3f}, multilingual {multilingual_ratio:.3f}")
    assert english_ratio > least[0] and multilingual_ratio > least[1]


def test_windows_cut_inside_characters(gpt2, whisper):
    retokenize = TeacherRetokenizer(gpt2, whisper)
    stream = token_stream(gpt2, [MULTILINGUAL[-1], MULTILINGUAL[5] + " 🤗🤗"])
    windows = torch.tensor([stream[s : s + 17] for s in range(len(stream) - 17)])
    starts_mid_character = sum(0x80 <= gpt2.pieces[w[0]][0] < 0xC0 for w in windows.tolist())
    assert starts_mid_character >= 5  # the test bites: windows that start with continuation bytes
    check_batch(retokenize, windows)


def test_eos_aligns_with_eos(gpt2, whisper):
    retokenize = TeacherRetokenizer(gpt2, whisper)
    first, second = gpt2.tokenizer.encode("Hello world.").ids, gpt2.tokenizer.encode(" Next").ids
    out = retokenize(torch.tensor([first + [gpt2.eos_id] + second]))
    teacher_first = whisper.tokenizer.encode("Hello world.").ids
    assert out["teacher_input_ids"][0, len(teacher_first)] == whisper.eos_id
    pairs = set(zip(out["align_teacher"][0].tolist(), out["align_student"][0].tolist(), strict=True))
    assert (len(teacher_first) - 1, len(first) - 1) in pairs  # "." predicts EOS on both sides
    assert (len(teacher_first), len(first)) in pairs  # EOS predicts " Next" on both sides


def test_literal_eos_text_is_not_a_document_boundary(gpt2, whisper):
    window = token_stream(gpt2, ["text with a literal <|endoftext|> inside"])
    out = TeacherRetokenizer(gpt2, whisper)(torch.tensor([window]))
    assert whisper.eos_id not in out["teacher_input_ids"][0].tolist()
    assert out["teacher_labels"][0, -1] == whisper.eos_id


def test_max_len_caps_the_teacher(gpt2, whisper):
    windows = random_windows(token_stream(gpt2, documents(MULTILINGUAL, 50, seed=5)), 3, 65, seed=6)
    assert TeacherRetokenizer(gpt2, whisper)(windows)["teacher_input_ids"].shape[1] > 20  # the cap bites
    check_batch(TeacherRetokenizer(gpt2, whisper, max_len=20), windows, max_len=20)


def test_window_shape_is_checked(gpt2, whisper):
    with pytest.raises(ValueError, match=r"\[B, T \+ 1\]"):
        TeacherRetokenizer(gpt2, whisper)(torch.tensor([1, 2, 3]))

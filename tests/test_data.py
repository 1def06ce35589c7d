"""lrc_dist.data and the shard format: packing against the raw token stream, mixture
proportions, rank disjointness, exact resume across world sizes, corruption and vocab checks."""

import json
import os
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lrc_dist.data import PERIOD, DistributedBatches, PackedMixture, TokenSet
from lrc_dist.indexed_dataset import SAMPLE_BLOCK_BYTES, CorruptShardError, Shard, ShardWriter
from lrc_dist.pretokenize import tokenize_corpus

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "assets" / "tokenizers" / "gpt2"
MULTILINGUAL = ROOT / "assets" / "tokenizers" / "whisper_multilingual"
SEQ = 16


def write_corpus(path: Path, words: list[str], docs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(3, 40)))}) + "\n")


@pytest.fixture(scope="session")
def token_sets(tmp_path_factory) -> list[Path]:
    """Three small GPT-2 token sets of different sizes, several shards each."""
    root = tmp_path_factory.mktemp("sets")
    vocabularies = [["alpha", "beta", "gamma"], ["Größe", "naïve", "日本語"], ["one", "two", "three", "🙂"]]
    paths = []
    for i, (words, docs) in enumerate(zip(vocabularies, [120, 60, 40])):
        write_corpus(root / f"corpus{i}.jsonl", words, docs, seed=i)
        out = root / f"set{i}"
        tokenize_corpus(
            str(root / f"corpus{i}.jsonl"), str(GPT2), str(out), shard_tokens=333, workers=1, progress=False
        )
        paths.append(out)
    return paths


def raw_stream(path: Path) -> np.ndarray:
    """A token set's stream read straight from the .bin files, in manifest order."""
    manifest = json.loads((path / "manifest.json").read_text())
    return np.concatenate([np.fromfile(path / f"{s['name']}.bin", dtype=np.uint16) for s in manifest["shards"]])


def test_windows_are_the_packed_stream_shuffled_per_epoch(token_sets):
    token_set = TokenSet.open(token_sets[0])
    stream = raw_stream(token_sets[0])
    assert token_set.num_tokens == stream.size and len(token_set.shards) > 3
    n = token_set.num_windows(SEQ)
    assert n == (stream.size - 1) // SEQ
    mixture = PackedMixture([token_set], [1.0], SEQ, seed=3, num_samples=3 * n)
    seen = []
    for i in range(3 * n):
        k, w = mixture.locate(i)
        sample = mixture[i]
        assert k == 0 and sample.dtype == torch.int64 and sample.shape == (SEQ + 1,)
        assert torch.equal(sample, torch.from_numpy(stream[w * SEQ : w * SEQ + SEQ + 1].astype(np.int64)))
        seen.append(w)
    epochs = [seen[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs), "each epoch visits every window once"
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    starts = token_set.starts[1:-1]
    assert any(w * SEQ < s < w * SEQ + SEQ + 1 for s in starts for w in range(n)), "some window spans two shards"
    assert (stream == token_set.eos_id).sum() == 120 and stream[-1] == token_set.eos_id


def test_sample_order_is_deterministic_in_the_seed(token_sets):
    sets = [TokenSet.open(p) for p in token_sets]
    a, b = PackedMixture(sets, [1, 1, 1], SEQ, seed=7), PackedMixture(sets, [1, 1, 1], SEQ, seed=7)
    c = PackedMixture(sets, [1, 1, 1], SEQ, seed=8)
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    assert not all(torch.equal(a[i], c[i]) for i in range(len(a)))


def test_mixture_proportions_follow_the_weights(token_sets):
    sets = [TokenSet.open(p) for p in token_sets]
    weights = np.array([0.5, 0.3, 0.2])
    num_samples = 2 * PERIOD + 1000  # several epochs of every set, past the schedule period
    mixture = PackedMixture(sets, weights, SEQ, seed=0, num_samples=num_samples)
    owners = np.array([mixture.locate(i)[0] for i in range(num_samples)])
    counts = np.stack([np.cumsum(owners == k) for k in range(3)], axis=1)
    expected = np.arange(1, num_samples + 1)[:, None] * weights
    assert np.abs(counts - expected).max() <= 2, "every prefix within 2 samples of its weights"
    for i in (0, 5, PERIOD + 17, num_samples - 1):
        k, w = mixture.locate(i)
        assert torch.equal(mixture[i], torch.from_numpy(sets[k].read(w * SEQ, SEQ + 1).astype(np.int64)))
    with pytest.raises(ValueError, match="one positive weight per token set"):
        PackedMixture(sets, [1, 0, 1], SEQ)
    with pytest.raises(IndexError):
        mixture[num_samples]


def collect(batches) -> list[torch.Tensor]:
    rows = []
    for batch in batches:
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1]), "labels are inputs shifted by one"
        rows += [torch.cat([ids, labels[-1:]]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    return rows


@pytest.fixture
def mixture(token_sets) -> PackedMixture:
    return PackedMixture([TokenSet.open(p) for p in token_sets], [0.6, 0.3, 0.1], SEQ, seed=1, num_samples=200)


def test_ranks_read_disjoint_slices_of_each_global_step(mixture):
    world, micro = 4, 3
    per_rank = [collect(DistributedBatches(mixture, micro, rank, world)) for rank in range(world)]
    steps = len(mixture) // (world * micro)
    assert all(len(rows) == steps * micro for rows in per_rank)
    for step in range(steps):
        first = step * world * micro
        for rank in range(world):
            for j in range(micro):
                expected = mixture[first + rank * micro + j]
                assert torch.equal(per_rank[rank][step * micro + j], expected)


def test_resume_continues_the_same_stream_with_another_world_size(mixture):
    uninterrupted = collect(DistributedBatches(mixture, micro_batch_size=4))
    assert len(uninterrupted) == 200

    # Two ranks, micro batch 2 (global 4 per micro step), stopped after 5 steps.
    ranks = [DistributedBatches(mixture, 2, rank, 2) for rank in range(2)]
    iterators = [iter(r) for r in ranks]
    first_part = []
    for _ in range(5):
        batches = [next(it) for it in iterators]
        first_part += [row for batch in batches for row in collect([batch])]
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() == {"consumed_samples": 20}

    resumed = DistributedBatches(mixture, 4, rank=0, world_size=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as saved in a checkpoint
    rest = collect(resumed)
    assert len(first_part) + len(rest) == 200
    assert all(torch.equal(a, b) for a, b in zip(first_part + rest, uninterrupted))
    assert resumed.consumed_samples == 200


def test_a_partial_last_step_is_dropped(mixture):
    batches = DistributedBatches(mixture, micro_batch_size=3, rank=1, world_size=3, consumed_samples=190)
    assert len(list(batches)) == 1 and batches.consumed_samples == 199


def copy_set(src: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    return dst, manifest


def test_damaged_shards_are_clear_errors(token_sets, tmp_path):
    path, manifest = copy_set(token_sets[0], tmp_path / "set")
    name = manifest["shards"][1]["name"]
    bin_path = path / f"{name}.bin"
    data = bytearray(bin_path.read_bytes())

    data[10] ^= 1
    bin_path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"{bin_path}: sampled-block checksum does not match") as error:
        TokenSet.open(path)
    assert f"delete {path / name}.json" in str(error.value)
    TokenSet.open(path, verify="none")  # an explicit opt-out still opens

    bin_path.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptShardError, match=f"{bin_path}: truncated or oversized token file"):
        TokenSet.open(path, verify="none")  # size is checked against the index even without checksums

    data[10] ^= 1
    bin_path.write_bytes(bytes(data))
    TokenSet.open(path, verify="full")
    idx_path = path / f"{name}.idx"
    idx = bytearray(idx_path.read_bytes())
    idx[40] ^= 1
    idx_path.write_bytes(bytes(idx))
    with pytest.raises(CorruptShardError, match=f"{idx_path}: index checksum does not match"):
        TokenSet.open(path)
    idx_path.unlink()
    with pytest.raises(CorruptShardError, match=f"{idx_path}: shard file is missing"):
        TokenSet.open(path)
    with pytest.raises(FileNotFoundError, match="tokenize.py merge"):
        TokenSet.open(tmp_path)


def test_fast_check_samples_blocks_and_full_check_reads_everything(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50000, size=2_000_000).astype(np.uint16)  # 4 MB: 16 sampled blocks
    writer = ShardWriter(tmp_path / "s", np.uint16)
    writer.add(tokens[:1_500_000], np.array([1_000_000, 500_000]))
    writer.add(tokens[1_500_000:], np.array([500_000]))
    assert not (tmp_path / "s.bin").exists(), "nothing under the final name before finish()"
    info = writer.finish()
    assert not list(tmp_path.glob("*.tmp"))
    shard = Shard.open(tmp_path / "s", info, verify="full")
    assert np.array_equal(shard.tokens, tokens) and shard.offsets.tolist() == [0, 1_000_000, 1_500_000, 2_000_000]
    assert info.max_token_id == tokens.max() and np.array_equal(shard.document(1), tokens[1_000_000:1_500_000])

    data = bytearray((tmp_path / "s.bin").read_bytes())
    data[SAMPLE_BLOCK_BYTES + 7] ^= 1  # between the first and second sampled block
    (tmp_path / "s.bin").write_bytes(bytes(data))
    Shard.open(tmp_path / "s", info, verify="fast")  # fast mode cannot see it: documented trade-off
    with pytest.raises(CorruptShardError, match="full checksum does not match"):
        Shard.open(tmp_path / "s", info, verify="full")
    data[SAMPLE_BLOCK_BYTES + 7] ^= 1
    data[-3] ^= 1  # in the last sampled block
    (tmp_path / "s.bin").write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="sampled-block checksum does not match"):
        Shard.open(tmp_path / "s", info, verify="fast")


def test_teacher_vocab_and_tokenizer_checks(token_sets):
    token_set = TokenSet.open(token_sets[0])
    token_set.check_teacher(50257, GPT2)
    token_set.check_teacher(50304, GPT2)  # padded embeddings are fine
    with pytest.raises(ValueError, match="vocab 50257, ids up to 50256.*teacher has vocab_size 32000"):
        token_set.check_teacher(32000)
    with pytest.raises(ValueError, match="token ids would fall outside its embedding"):
        token_set.check_teacher(50256)  # id 50256 (EOS) needs 50257 rows
    with pytest.raises(ValueError, match=f"not the teacher's {MULTILINGUAL}"):
        token_set.check_teacher(50258, MULTILINGUAL)  # a real, different tokenizer of about the same size
    with pytest.warns(UserWarning, match="retokenize with the teacher's tokenizer"):
        token_set.check_teacher(50258, MULTILINGUAL, on_mismatch="warn")


def test_sets_from_different_tokenizers_do_not_mix(token_sets, tmp_path):
    write_corpus(tmp_path / "c.jsonl", ["hello", "world"], 50, seed=0)
    tokenize_corpus(str(tmp_path / "c.jsonl"), str(MULTILINGUAL), str(tmp_path / "m"), workers=1, progress=False)
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedMixture([TokenSet.open(token_sets[0]), TokenSet.open(tmp_path / "m")], [1, 1], SEQ)


def test_open_raises_a_low_open_file_limit(token_sets):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, hard))  # fewer than the set's shards need
    try:
        token_set = TokenSet.open(token_sets[0])
        assert len(token_set.shards) > 8
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= in_use + len(token_set.shards)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

"""Training data: memory-mapped token sets packed into fixed windows, mixed by weight, and
split across data-parallel ranks.

    sets = [TokenSet.open("tokens/fineweb"), TokenSet.open("tokens/openhermes")]
    for token_set in sets:
        token_set.check_teacher(teacher_config.vocab_size, teacher_tokenizer_dir)
    dataset = PackedMixture(sets, [0.95, 0.05], seq_len=2048, seed=1234, num_samples=steps * global_batch)
    batches = DistributedBatches(dataset, micro_batch_size=4, rank=rank, world_size=world,
                                 consumed_samples=checkpoint.get("consumed_samples", 0))
    for batch in batches:  # {"input_ids": LongTensor[4, 2048], "labels": LongTensor[4, 2048]}
        ...
        checkpoint.update(batches.state_dict())

Sample order. A token set is one stream of tokens: its shards concatenated in manifest order,
every document ending with EOS (packed, no document masking, as in the LRC paper). Window w
of a set is stream[w*seq_len : w*seq_len + seq_len + 1]: neighbouring windows share one
token, so every token but the first is a label once per epoch. Global sample i is the j-th
draw from set k by a fixed schedule of PERIOD slots, in which set k owns round(weight_k *
PERIOD) slots spread evenly, so every prefix of the stream holds each set within a few
samples of its weight. Draw j of set k reads window perm[k, e][j mod n_k], where e = j // n_k
is that set's epoch and perm[k, e] a permutation seeded by (seed, k, e). Sample i thus
depends only on (sets, weights, seq_len, seed): not on world size, micro batch or
gradient accumulation.

Distribution. Micro steps consume consecutive samples: with W ranks and micro batch B, the
step at consumed_samples = c reads samples [c, c + W*B), rank r the slice [c + r*B, c + (r+1)*B),
then c += W*B. The only state is c, a global count, so a run resumed with another world size
continues exactly where it stopped, and an optimizer step of G = B * W * grad_accum samples
covers the same samples whatever W is.
"""

from __future__ import annotations

import os
import resource
import warnings
from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lrc_dist.indexed_dataset import CorruptShardError, Manifest, Shard, ShardInfo, tokenizer_sha256

PERIOD = 1 << 16  # mixture schedule length; each set's share is exact over every period


class TokenSet:
    """A tokenized corpus (an output directory of data_prep/tokenize.py), memory-mapped."""

    def __init__(self, path: Path, manifest: Manifest, shards: list[Shard]):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        # stream offset of each shard, plus the total
        self.starts = np.concatenate([[0], np.cumsum([s.tokens.size for s in shards])]).astype(np.int64)

    @classmethod
    def open(cls, path: str | Path, verify: str = "fast") -> TokenSet:
        """Opens a token set; verify "fast" (sizes, index and sampled-block checksums), "full"
        (whole-file checksums) or "none". A missing, truncated or corrupt shard raises
        CorruptShardError naming the file and how to re-create it."""
        path = Path(path)
        file = path / "manifest.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: tokenize the corpus with data_prep/tokenize.py --output {path} "
                f"(after a split run, combine the parts with: data_prep/tokenize.py merge {path})"
            )
        manifest = Manifest.read(file)
        _reserve_file_descriptors(len(manifest.shards))
        shards = []
        for entry in manifest.shards:
            try:
                shards.append(Shard.open(path / entry["name"], ShardInfo.from_dict(entry), verify))
            except CorruptShardError as e:
                raise CorruptShardError(
                    f"{e}. To re-create it, delete {path / entry['name']}.json and the .source.json record of "
                    f"{entry['source']} in {path}, then rerun data_prep/tokenize.py with the same arguments"
                ) from None
        if not shards:
            raise ValueError(f"{file} lists no shards: the corpus produced no documents")
        return cls(path, manifest, shards)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest.tokenizer["eos_id"]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside {self.path} ({self.num_tokens} tokens)")
        pieces = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            piece = self.shards[k].tokens[start - self.starts[k] :][:length]
            if piece.size and int(piece.max()) >= self.vocab_size:  # 2 us a window (bench/loader_bench.py)
                at = start - self.starts[k] + int(np.argmax(piece >= self.vocab_size))
                raise CorruptShardError(
                    f"{self.shards[k].prefix}.bin: token id {int(piece.max())} at position {at} is outside the "
                    f"vocabulary of {self.vocab_size} it was tokenized with: the shard is corrupt; re-create it "
                    f"(data_prep/tokenize.py verify {self.path} --mode full finds every such shard)")
            pieces.append(piece)
            start, length, k = start + piece.size, length - piece.size, k + 1
        return np.concatenate(pieces)

    def num_windows(self, seq_len: int) -> int:
        """Number of seq_len + 1 token windows (overlapping by one token) in the stream."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def check_teacher(
        self, vocab_size: int, tokenizer_dir: str | Path | None = None, on_mismatch: str = "error"
    ) -> None:
        """Checks that this set fits a teacher with `vocab_size` embeddings (a ValueError otherwise).

        With `tokenizer_dir` (the teacher's tokenizer files), also compares the sha256 of its
        tokenizer.json with the one the set was made with: a different tokenizer of the same
        size maps the same ids to other strings and would silently train on garbage, so a
        mismatch is an error by default. If the files are known to differ only in ways that keep
        the ids (a re-save that changed formatting or defaults), pass on_mismatch="warn".
        """
        size, tokenizer = misfit(self.path, self.manifest, vocab_size, tokenizer_dir)
        if size:
            raise ValueError(size)
        if tokenizer and on_mismatch == "error":
            raise ValueError(tokenizer)
        if tokenizer:
            warnings.warn(tokenizer, stacklevel=2)


def misfit(path: Path, manifest: Manifest, vocab_size: int, tokenizer_dir: str | Path | None) -> tuple[str | None, str | None]:
    """How the token set at `path` (its `manifest`) does not fit a model of `vocab_size` with the
    tokenizer in `tokenizer_dir`: (ids beyond the vocabulary, another tokenizer), each None if fine."""
    max_id = max((s["max_token_id"] for s in manifest.shards), default=-1)
    tokenizer = manifest.tokenizer
    size = other = None
    if max_id >= vocab_size or tokenizer["vocab_size"] > vocab_size:
        size = (f"{path} was tokenized with {tokenizer['name']} (vocab {tokenizer['vocab_size']}, ids up to "
                f"{max_id}) but the teacher has vocab_size {vocab_size}: token ids would fall outside its "
                "embedding. Retokenize the corpus with the teacher's tokenizer")
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        sha = tokenizer_sha256(Path(tokenizer_dir) / "tokenizer.json")
        if sha != tokenizer["sha256"]:
            other = (f"{path} was tokenized with {tokenizer['path']} (sha256 {tokenizer['sha256'][:12]}), "
                     f"not the teacher's {tokenizer_dir} (sha256 {sha[:12]}): retokenize with the teacher's tokenizer")
    return size, other


def _reserve_file_descriptors(count: int) -> None:
    """Each memory-mapped shard holds a file descriptor: raise the soft limit when needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(os.listdir("/proc/self/fd")) + count + 64 if os.path.isdir("/proc/self/fd") else count + 1024
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise OSError(
            f"memory-mapping {count} more shards needs {need} open files, above the hard limit of {hard}: "
            "raise it (ulimit -Hn) or tokenize into fewer, larger shards (fewer, larger input files)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of `total` proportional to weights (largest remainder)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: total - counts.sum()]] += 1
    return counts


class PackedMixture(torch.utils.data.Dataset):
    """Windows of seq_len + 1 tokens drawn from several token sets by weight (see module doc).

    `num_samples` is the length of the mixture (e.g. steps * global batch); by default the
    total number of windows of all sets. Sets are repeated, with a new permutation each
    epoch, when their weight asks for more windows than they hold.
    """

    def __init__(
        self,
        sets: Sequence[TokenSet],
        weights: Sequence[float],
        seq_len: int,
        seed: int = 0,
        num_samples: int | None = None,
    ):
        weights = np.asarray(weights, dtype=np.float64)
        if len(sets) == 0 or len(sets) != len(weights) or not np.all(weights > 0):
            raise ValueError(
                f"need one positive weight per token set, got {len(sets)} sets and weights {weights.tolist()}"
            )
        for token_set in sets[1:]:
            if token_set.manifest.tokenizer != sets[0].manifest.tokenizer:
                raise ValueError(f"{token_set.path} and {sets[0].path} were tokenized with different tokenizers")
        self.sets, self.seq_len, self.seed = list(sets), seq_len, seed
        self.windows = [s.num_windows(seq_len) for s in sets]
        for token_set, n in zip(sets, self.windows, strict=True):
            if n == 0:
                raise ValueError(
                    f"{token_set.path} has {token_set.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}"
                )
        self.slots = _apportion(weights, PERIOD)
        if not np.all(self.slots > 0):
            raise ValueError(f"weights {weights.tolist()}: each weight must be at least 1/{PERIOD} of the total")
        # Slot j of set k is due at (j + 0.5) / slots_k of the period: sorting by due time spreads
        # each set evenly; a stable sort breaks ties by set order.
        due = np.concatenate([(np.arange(c) + 0.5) / c for c in self.slots])
        order = np.argsort(due, kind="stable")
        self._slot_set = np.repeat(np.arange(len(sets)), self.slots)[order]
        self._slot_draw = np.concatenate([np.arange(c) for c in self.slots])[order]
        self.num_samples = sum(self.windows) if num_samples is None else num_samples
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, i: int) -> tuple[int, int]:
        """(set index, window index within that set) of global sample i."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside the mixture of {self.num_samples} samples")
        period, slot = divmod(i, PERIOD)
        k = int(self._slot_set[slot])
        epoch, position = divmod(period * int(self.slots[k]) + int(self._slot_draw[slot]), self.windows[k])
        return k, int(self._permutation(k, epoch)[position])

    def __getitem__(self, i: int) -> torch.Tensor:
        """Global sample i: LongTensor[seq_len + 1] (inputs are [:-1], labels [1:])."""
        k, window = self.locate(i)
        return torch.from_numpy(self.sets[k].read(window * self.seq_len, self.seq_len + 1).astype(np.int64))

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        if (k, epoch) not in self._permutations:
            if len(self._permutations) >= 2 * len(self.sets):  # samples move forward: drop the oldest
                del self._permutations[next(iter(self._permutations))]
            n = self.windows[k]
            perm = np.random.default_rng([self.seed, k, epoch]).permutation(n).astype(np.min_scalar_type(n))
            self._permutations[k, epoch] = perm
        return self._permutations[k, epoch]


class DistributedBatches:
    """This rank's micro batches of a global sample stream, resumable by `consumed_samples`.

    Yields {"input_ids": LongTensor[B, seq_len], "labels": LongTensor[B, seq_len]} (labels are
    the inputs shifted by one; with `sample_ids`, also "sample_ids": the samples' indices in the
    stream) until fewer than micro_batch_size * world_size samples remain.
    `consumed_samples` counts the samples of all ranks yielded so far: save `state_dict()` with
    the checkpoint and pass it back (with any world size) to continue the same stream.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        consumed_samples: int = 0,
        sample_ids: bool = False,
    ):
        if not 0 <= rank < world_size or micro_batch_size < 1:
            raise ValueError(
                f"need 0 <= rank < world_size and micro_batch_size >= 1, got {rank}, {world_size}, {micro_batch_size}"
            )
        self.dataset = dataset
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.consumed_samples = consumed_samples
        self.sample_ids = sample_ids

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.micro_batch_size * self.world_size
        while self.consumed_samples + step <= len(self.dataset):
            first = self.consumed_samples + self.rank * self.micro_batch_size
            windows = torch.stack([self.dataset[i] for i in range(first, first + self.micro_batch_size)])
            self.consumed_samples += step
            batch = {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
            if self.sample_ids:
                batch["sample_ids"] = torch.arange(first, first + self.micro_batch_size)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])

"""The loader's token-id bounds check: what it adds to reading a training window.

Reads `windows` windows of seq_len + 1 tokens from a token set the way training does
(PackedMixture.__getitem__, which checks every piece's largest id against the vocabulary), and,
side by side on the same windows, times the check alone (a max over the window and a compare).
Prints both per window and their ratio.

    .venv/bin/python bench/loader_bench.py [--seq_len 2048] [--windows 4000] [--megabytes 16]
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

from lrc_dist.data import PackedMixture, TokenSet
from lrc_dist.pretokenize import tokenize_corpus
from lrc_dist.resources import PACKAGE


def main(seq_len: int = 2048, windows: int = 4000, megabytes: float = 16.0, repeats: int = 3) -> None:
    words = open(PACKAGE / "assets/tasks/pydoc_cloze.jsonl").read().split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w") as f:
            while f.tell() < megabytes * 1e6:
                f.write(json.dumps({"text": " ".join(rng.choices(words, k=300))}) + "\n")
        tokenize_corpus(str(corpus), str(PACKAGE / "assets/tokenizers/gpt2"), str(Path(tmp) / "tokens"), workers=1,
                        progress=False)
        token_set = TokenSet.open(Path(tmp) / "tokens")
        mixture = PackedMixture([token_set], [1.0], seq_len)
        n = min(windows, len(mixture))
        arrays = [token_set.read(mixture.locate(i)[1] * seq_len, seq_len + 1) for i in range(n)]
        read = check = float("inf")
        for _ in range(repeats):  # interleaved, best of each
            t = time.perf_counter()
            for i in range(n):
                mixture[i]
            read = min(read, (time.perf_counter() - t) / n)
            t = time.perf_counter()
            for a in arrays:
                int(a.max()) >= token_set.vocab_size
            check = min(check, (time.perf_counter() - t) / n)
    print(f"{n} windows of {seq_len + 1} tokens: read {read * 1e6:.1f} us/window (check included), "
          f"check alone {check * 1e6:.2f} us/window = {check / read:.1%} of a read; "
          f"{np.dtype(token_set.manifest.dtype).name} tokens")


if __name__ == "__main__":
    fire.Fire(main)

"""Tokenization throughput: the full pipeline vs bare `tokenizers` on the same corpus and cores.

Pipeline: lrc_dist.pretokenize.tokenize_corpus (what data_prep/tokenize.py runs): read JSON
lines, batch-encode, append EOS, write shards with checksums, in `workers` processes, process
start-up included. Baselines: tokenizers.Tokenizer.encode_batch (the target's reference) and
encode_batch_fast (what the pipeline calls: no offsets) on the same documents, already in
memory, in batches of the same size, with the library's thread pool over all cores. All run
`repeats` times, interleaved; the best of each is compared (the machine may be shared), in
wall-clock tokens/s and, less sensitive to other load, in tokens per CPU-second.

    .venv/bin/python bench/tokenize_bench.py [--megabytes 48] [--files 8] [--workers N] [--repeats 3]

The corpus is English prose from Python's own documentation (pydoc_data) shuffled into
documents of 2-20 paragraphs, with every third document in another script (Greek, Cyrillic,
CJK, accents, emoji) so that byte-level fallbacks get exercised too.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import fire
import pydoc_data.topics

from lrc_dist.pretokenize import tokenize_corpus
from lrc_dist.sources import BATCH_RECORDS
from lrc_dist.tokenizer_files import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = "Größe naïve café Ελληνικά γλώσσα Русский язык 日本語のテキスト 中文文本 한국어 🙂🚀 ".split()


def make_corpus(directory: Path, megabytes: float, files: int, seed: int = 0) -> list[str]:
    """Writes `files` JSON-lines files of about `megabytes` in total; returns the documents."""
    rng = random.Random(seed)
    paragraphs = [p.strip() for topic in pydoc_data.topics.topics.values() for p in topic.split("\n\n") if p.strip()]
    docs, size = [], 0
    while size < megabytes * 1e6:
        doc = "\n\n".join(rng.sample(paragraphs, rng.randint(2, 20)))
        if len(docs) % 3 == 2:
            words = doc.split(" ")
            doc = " ".join(rng.choice(FOREIGN) if rng.random() < 0.3 else w for w in words)
        docs.append(doc)
        size += len(doc.encode())
    for i in range(files):
        with open(directory / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[i::files])
    return docs


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: robust to other load on the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def raw_encode(tokenizer_dir: Path, docs: list[str], method: str) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of bare Tokenizer.`method` over `docs`, in pipeline-sized batches."""
    encode = getattr(load_tokenizer(tokenizer_dir), method)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for i in range(0, len(docs), BATCH_RECORDS):
        tokens += sum(len(e.ids) for e in encode(docs[i : i + BATCH_RECORDS], add_special_tokens=False))
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def pipeline(corpus: Path, tokenizer_dir: Path, output: Path, workers: int) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens without EOS) of a fresh full-pipeline run, process start-up included."""
    shutil.rmtree(output, ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = tokenize_corpus(str(corpus), str(tokenizer_dir), str(output), workers=workers, progress=False)
    return time.perf_counter() - start, cpu_seconds() - cpu, manifest.num_tokens - manifest.num_docs


def main(
    megabytes: float = 48,
    files: int = 8,
    workers: int | None = None,
    repeats: int = 3,
    tokenizer: str = str(ROOT / "assets/tokenizers/gpt2"),
) -> None:
    cpus = len(os.sched_getaffinity(0))
    workers = workers or cpus
    with tempfile.TemporaryDirectory() as tmp:
        corpus, output = Path(tmp) / "corpus", Path(tmp) / "tokens"
        corpus.mkdir()
        docs = make_corpus(corpus, megabytes, files)
        runs: dict[str, list[tuple[float, float, int]]] = {"encode_batch": [], "encode_batch_fast": [], "pipeline": []}
        for _ in range(repeats):
            for method in ("encode_batch", "encode_batch_fast"):
                runs[method].append(raw_encode(Path(tokenizer), docs, method))
            runs["pipeline"].append(pipeline(corpus, Path(tokenizer), output, workers))
    tokens = runs["pipeline"][0][2]
    assert all(r[2] == tokens for rs in runs.values() for r in rs), (
        "the pipeline and the baselines count different tokens"
    )
    best = {name: (min(r[0] for r in rs), min(r[1] for r in rs)) for name, rs in runs.items()}
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {cpus} CPUs, load average {load:.2f}; tokenizer {Path(tokenizer).name}")
    print(
        f"corpus: {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} M chars in {files} files, {tokens:,} tokens"
    )
    for name, rs in runs.items():
        label = f"pipeline ({workers} workers)" if name == "pipeline" else f"raw {name} ({cpus} threads)"
        print(
            f"{label:34s} {tokens / best[name][0] / 1e6:.3f} M tokens/s, {tokens / best[name][1] / 1e6:.3f} M tokens "
            f"per CPU-second (runs: {', '.join(f'{r[0]:.2f}' for r in rs)} s)"
        )
    for name in ("encode_batch", "encode_batch_fast"):
        print(
            f"ratio pipeline / raw {name}: {best[name][0] / best['pipeline'][0]:.3f} tokens/s, "
            f"{best[name][1] / best['pipeline'][1]:.3f} tokens per CPU-second"
            + (" (target >= 0.9)" if name == "encode_batch" else "")
        )


if __name__ == "__main__":
    fire.Fire(main)

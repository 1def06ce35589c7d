"""Tokenize a corpus into a token set for lrc_dist training (the pipeline: lrc_dist/pretokenize.py).

    lrc-tokenize ...  =  python -m lrc_dist.prep ...  =  python data_prep/tokenize.py ...

    python data_prep/tokenize.py --input 'data/fineweb/*.parquet' --tokenizer TEACHER_DIR --output tokens/fineweb
    python data_prep/tokenize.py --input openhermes2_5.json --chat_field conversations \\
        --tokenizer TEACHER_DIR --output tokens/openhermes
    python data_prep/tokenize.py --input '["a.jsonl.zst", "more/", "b/*.json.gz"]' --tokenizer DIR --output OUT
    python data_prep/tokenize.py merge tokens/fineweb          # after a split run (slurm/tokenize_array.sh)
    python data_prep/tokenize.py verify tokens/fineweb --mode full
    python data_prep/tokenize.py inspect tokens/openhermes     # what the chat template produced

Options of the default command: see `lrc_dist.pretokenize.tokenize_corpus` (--text_field,
--chat_field, --workers, --shard_tokens, --max_chars, --long_docs, --eos_token, --num_splits,
--split_index, --allow_errors). A rerun with the same arguments resumes: finished shards are
skipped. Exit status 1, with a message naming the file and the fix, on bad settings, files
that could not be read (unless --allow_errors), no document produced, or a corrupt shard.
"""

import functools
import sys
from pathlib import Path

import fire

from lrc_dist.pretokenize import TokenizeError, merge_splits, tokenize_corpus


@functools.wraps(tokenize_corpus)
def tokenize(*args, **kwargs) -> None:
    tokenize_corpus(*args, **kwargs)  # the manifest is on disk; fire would print the returned dict


tokenize.__doc__ += """
Other commands:
    verify DIR [--mode full|fast]   check every shard of the token set DIR
    merge DIR                       combine the manifests of a split run (Slurm arrays)
    inspect DIR                     counts, settings, and a few documents and windows decoded
"""


@functools.wraps(merge_splits)
def merge(*args, **kwargs) -> None:
    merge_splits(*args, **kwargs)


def verify(dir: str, mode: str = "full") -> None:
    """Checks every shard of the token set DIR against its manifest ("fast" or "full" checksums)."""
    from lrc_dist.data import TokenSet  # imports torch: keep it out of tokenizing (and its workers)

    token_set = TokenSet.open(dir, verify=mode)
    print(f"{dir}: {len(token_set.shards)} shards, {token_set.num_tokens:,} tokens verified ({mode})")


def inspect(dir: str, docs: int = 3, windows: int = 2, seq_len: int = 64, chars: int = 300,
            tokenizer: str | None = None) -> None:
    """Shows the token set DIR: its counts, per-file report and settings, then its first DOCS
    documents and WINDOWS training windows of SEQ_LEN tokens decoded, each cut to CHARS
    characters (special tokens shown as written, e.g. a chat template's). TOKENIZER overrides
    the tokenizer directory recorded in the manifest (if it has moved)."""
    import numpy as np
    from tokenizers import Tokenizer

    from lrc_dist.data import PackedMixture, TokenSet

    token_set = TokenSet.open(dir, verify="fast")
    m, tok = token_set.manifest, token_set.manifest.tokenizer
    print(f"{dir}: {m.summary()}")
    lengths = np.concatenate([np.diff(s.offsets) for s in token_set.shards])
    print(f"  documents: {lengths.size:,}, tokens per document: mean {lengths.mean():,.0f}, median "
          f"{int(np.median(lengths)):,}, max {lengths.max():,}")
    print(f"  tokenizer: {tok['name']} ({tok['path']}), vocab {tok['vocab_size']:,}, EOS {tok['eos_token']!r} = "
          f"{tok['eos_id']}, sha256 {tok['sha256'][:12]}; dtype {m.dtype}")
    settings = {k: v for k, v in m.config.items() if k in ("text_field", "chat_field", "max_chars", "long_docs")}
    print(f"  settings: {settings}")
    decoder = Tokenizer.from_file(str(Path(tokenizer or tok["path"]) / "tokenizer.json"))

    def show(ids) -> str:
        text = decoder.decode([int(i) for i in ids], skip_special_tokens=False)
        return repr(text if len(text) <= chars else text[:chars] + " ...")

    shard = token_set.shards[0]
    for i in range(min(docs, shard.num_docs)):
        print(f"--- document {i} ({shard.offsets[i + 1] - shard.offsets[i]} tokens): {show(shard.document(i))}")
    if windows and token_set.num_windows(seq_len):
        mixture = PackedMixture([token_set], [1.0], seq_len)
        for i in range(min(windows, len(mixture))):
            print(f"--- training window {i} ({seq_len} + 1 tokens, as the loader packs them): {show(mixture[i])}")


def main(prog: str = "lrc-tokenize") -> None:
    commands = {"merge": merge, "verify": verify, "inspect": inspect}
    try:
        if len(sys.argv) > 1 and sys.argv[1] in commands:
            fire.Fire(commands[sys.argv[1]], command=sys.argv[2:], name=f"{prog} {sys.argv[1]}")
        else:
            fire.Fire(tokenize, name=prog)
    except (TokenizeError, ValueError, FileNotFoundError) as e:  # bad input or settings: the message says why
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

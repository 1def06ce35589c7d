"""Tokenize a corpus into a token set for lrc_dist training (the pipeline: lrc_dist/pretokenize.py).

    lrc-tokenize ...  =  python -m lrc_dist.prep ...  =  python data_prep/tokenize.py ...

    python data_prep/tokenize.py --input 'data/fineweb/*.parquet' --tokenizer TEACHER_DIR --output tokens/fineweb
    python data_prep/tokenize.py --input openhermes2_5.json --chat_field conversations \\
        --tokenizer TEACHER_DIR --output tokens/openhermes
    python data_prep/tokenize.py --input '["a.jsonl.zst", "more/", "b/*.json.gz"]' --tokenizer DIR --output OUT
    python data_prep/tokenize.py merge tokens/fineweb          # after a split run (slurm/tokenize_array.sh)
    python data_prep/tokenize.py verify tokens/fineweb --mode full

Options of the default command: see `lrc_dist.pretokenize.tokenize_corpus` (--text_field,
--chat_field, --workers, --shard_tokens, --max_chars, --long_docs, --eos_token, --num_splits,
--split_index, --allow_errors). A rerun with the same arguments resumes: finished shards are
skipped. Exit status 1, with a message naming the file and the fix, on bad settings, files
that could not be read (unless --allow_errors), no document produced, or a corrupt shard.
"""

import functools
import sys

import fire

from lrc_dist.pretokenize import TokenizeError, merge_splits, tokenize_corpus


@functools.wraps(tokenize_corpus)
def tokenize(*args, **kwargs) -> None:
    tokenize_corpus(*args, **kwargs)  # the manifest is on disk; fire would print the returned dict


tokenize.__doc__ += """
Other commands:
    verify DIR [--mode full|fast]   check every shard of the token set DIR
    merge DIR                       combine the manifests of a split run (Slurm arrays)
"""


@functools.wraps(merge_splits)
def merge(*args, **kwargs) -> None:
    merge_splits(*args, **kwargs)


def verify(dir: str, mode: str = "full") -> None:
    """Checks every shard of the token set DIR against its manifest ("fast" or "full" checksums)."""
    from lrc_dist.data import TokenSet  # imports torch: keep it out of tokenizing (and its workers)

    token_set = TokenSet.open(dir, verify=mode)
    print(f"{dir}: {len(token_set.shards)} shards, {token_set.num_tokens:,} tokens verified ({mode})")


def main(prog: str = "lrc-tokenize") -> None:
    commands = {"merge": merge, "verify": verify}
    try:
        if len(sys.argv) > 1 and sys.argv[1] in commands:
            fire.Fire(commands[sys.argv[1]], command=sys.argv[2:], name=f"{prog} {sys.argv[1]}")
        else:
            fire.Fire(tokenize, name=prog)
    except (TokenizeError, ValueError, FileNotFoundError) as e:  # bad input or settings: the message says why
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

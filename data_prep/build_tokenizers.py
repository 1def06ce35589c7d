"""Builds the real BPE tokenizers shipped under assets/tokenizers/ from OpenAI's tiktoken ranks.

The hub is out of reach, but the `openai-whisper` source distribution on PyPI (MIT licensed)
ships GPT-2's byte-level BPE ranks (`gpt2.tiktoken`) and Whisper's multilingual ranks
(`multilingual.tiktoken`). This script converts them into Hugging Face fast-tokenizer
directories (tokenizer.json + tokenizer_config.json + chat_template.jinja) that load with
`tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer.from_pretrained`.

    .venv/bin/pip download --no-deps --no-binary :all: openai-whisper==20250625 -d /tmp/whisper
    .venv/bin/python data_prep/build_tokenizers.py --sdist /tmp/whisper/openai_whisper-20250625.tar.gz

Only `<|endoftext|>` is added as a special token (GPT-2's EOS, id 50256 / 50257), so the
vocabularies are exactly the published ones; Whisper's speech control tokens are left out.
"""

from __future__ import annotations

import base64
import tarfile
from pathlib import Path

import fire
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# GPT-2's pre-tokenizer regex, as in whisper/tokenizer.py (both encodings use it).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS = "<|endoftext|>"
# A plain-text template: it adds no tokens, so the vocabulary stays GPT-2's. Tests use it to
# render OpenHermes-style conversations; real runs use the teacher's own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ENCODINGS = {"gpt2": "gpt2.tiktoken", "whisper_multilingual": "multilingual.tiktoken"}
# Reference ids from GPT-2's published encoder (the Hugging Face `gpt2` model card examples).
GPT2_REFERENCE = {
    "Hello world": [15496, 995],
    "Hello, my dog is cute": [15496, 11, 616, 3290, 318, 13779],
    "<|endoftext|>": [50256],
}


def read_ranks(sdist: Path, member: str) -> dict[bytes, int]:
    """Reads a `.tiktoken` file (base64 token, rank per line) from the whisper sdist."""
    with tarfile.open(sdist) as tar:
        path = next(n for n in tar.getnames() if n.endswith(f"whisper/assets/{member}"))
        lines = tar.extractfile(path).read().decode().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def build(ranks: dict[bytes, int], output: Path) -> PreTrainedTokenizerFast:
    """Converts tiktoken ranks to a byte-level BPE fast tokenizer and saves it to `output`."""

    class Converter(TikTokenConverter):
        # transformers reads ranks through the `tiktoken` package; we already have them.
        @staticmethod
        def load_tiktoken_bpe(_url: str) -> dict[bytes, int]:
            return ranks

    backend = Converter(vocab_file="unused", pattern=GPT2_PATTERN, extra_special_tokens=[EOS]).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS, chat_template=CHAT_TEMPLATE
    )
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(output)
    # Compact JSON keeps the shipped assets small (save_pretrained pretty-prints).
    backend.save(str(output / "tokenizer.json"), pretty=False)
    return tokenizer


def main(sdist: str, output: str = "assets/tokenizers") -> None:
    """Builds assets/tokenizers/{gpt2,whisper_multilingual} from an openai-whisper sdist tarball."""
    for name, member in ENCODINGS.items():
        tokenizer = build(read_ranks(Path(sdist), member), Path(output) / name)
        print(f"{name}: vocab {len(tokenizer)}, eos id {tokenizer.eos_token_id} -> {Path(output) / name}")
        if name == "gpt2":
            for text, ids in GPT2_REFERENCE.items():
                got = tokenizer.encode(text)
                assert got == ids, f"GPT-2 reference mismatch for {text!r}: {got} != {ids}"
            print("gpt2: matches GPT-2 reference encodings")


if __name__ == "__main__":
    fire.Fire(main)

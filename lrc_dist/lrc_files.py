"""LRC's trainable state on disk, beside an LRC export's HF student (`RUN_DIR/export_N/lrc`): the
trainable tensors and a config that names the teacher (referenced, never copied; its fingerprint is
checked) and, across tokenizers, the student's tokenizer. `build.load_lrc` reads it back."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lrc_dist.indexed_dataset import tokenizer_sha256
from lrc_dist.model import CheckpointError, teacher_fingerprint

LRC_CONFIG_FILE, LRC_WEIGHTS_FILE = "lrc_config.json", "lrc_trainable.safetensors"


def save_lrc(model: nn.Module, path: str | Path, teacher_path: str | Path) -> None:
    """Write the trainable tensors and the config of `model`, an `lrc.LowRankClone` (not imported:
    lrc.py imports this module); the teacher is referenced, never copied."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the student only: the DSKD projector is a training-time tool, no part of the student
    state = {k: v.contiguous() for k, v in model.trainable_state_dict().items() if not k.startswith("dual_space.")}
    save_file(state, str(path / LRC_WEIGHTS_FILE))
    meta = {"teacher": str(Path(teacher_path).resolve()), "teacher_fingerprint": teacher_fingerprint(teacher_path),
            "lrc": asdict(model.cfg), "dense": model.dense}
    if model.cross_tokenizer:  # the student's vocabulary is rebuilt from its tokenizer (lrc_dist.vocab)
        tokenizer = model.vocab.tokenizer_dir
        meta.update(student_tokenizer=str(tokenizer.resolve()), student_tokenizer_sha256=tokenizer_sha256(
            tokenizer / "tokenizer.json"))
    (path / LRC_CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def check_teacher(teacher: str | Path, fingerprint: str | None, source: str | Path) -> None:
    """A CheckpointError when the teacher at `teacher` is not the one `source` was trained with."""
    if fingerprint is not None and teacher_fingerprint(teacher) != fingerprint:
        raise CheckpointError(f"{source} was trained with another teacher than the one in {teacher} (fingerprint "
                              f"{fingerprint}, now {teacher_fingerprint(teacher)}: its config.json or weights differ). "
                              f"Point it at the teacher the student was distilled from.")


def read_lrc_meta(path: str | Path) -> dict:
    """{"teacher": path, "lrc": LRCConfig fields} of a directory written by `save_lrc`."""
    file = Path(path) / LRC_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {LRC_CONFIG_FILE}; pass a directory written by lrc_dist.lrc_files.save_lrc.")
    return json.loads(file.read_text())

"""Export a student as an ordinary Hugging Face checkpoint.

    python -m lrc_dist.export SOURCE OUT_DIR [--dtype bfloat16] [--teacher DIR] [--max_shard_size 5GB] [--overwrite]

SOURCE is any of:
- a run directory (`checkpoint.dir`): its latest checkpoint;
- a checkpoint `RUN_DIR/step_N` of any backend (none or FSDP: DCP; DeepSpeed: ZeRO), read on
  one process, without torchrun;
- an `lrc` directory written by `lrc_dist.lrc.save_lrc` (e.g. `RUN_DIR/export_N/lrc`).

The student is materialised once (LRC: W_T @ P etc.) and saved in the teacher's architecture with
hidden_size = d_S, an explicit head_dim (it no longer equals hidden_size / heads), the student's
rms_norm_eps and tie flag, the tokenizer files and a model card (README.md), so that
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` just works. OUT_DIR appears complete or not at all:
it is written beside itself and renamed into place, with the umask's usual modes (0644 files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import fire
import torch
from huggingface_hub import save_torch_state_dict

from lrc_dist.build import build_model, dtype_of
from lrc_dist.checkpoint import LATEST, TRAIN_STATE, Checkpointer, CheckpointDamaged, damage, read_train_state
from lrc_dist.config import TrainConfig, config_of
from lrc_dist.interface import DistillationModel
from lrc_dist.lrc import LRC_CONFIG_FILE, check_teacher, load_lrc, read_lrc_meta
from lrc_dist.model import CheckpointError

# Files that make up a tokenizer (and generation defaults) in an HF checkpoint directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def export_student(
    model: DistillationModel,
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


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yields a fresh directory beside `final`; when the block succeeds, gives every file and dir
    the mode a plain `open`/`mkdir` would (0644/0755 under umask 022; some writers make 0600
    temporaries) and renames it to `final`, replacing an older one when `overwrite`."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; choose another output directory or pass --overwrite.")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash mid-export
    tmp.mkdir(parents=True)
    yield tmp
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def model_card(model: DistillationModel, teacher: str, summary: dict) -> str:
    """README.md of an export: what was distilled from what, how far, and the last loss terms."""
    method = summary.get("method", "lrc")
    config = model.student_hf_config()
    params = sum(t.numel() for t in model.student_state_dict().values())
    rows = [("method", {"lrc": "Low-Rank Clone (LRC)", "kd": "logit knowledge distillation",
                        "lm": "language modelling (no teacher)"}.get(method, method)),
            ("teacher", f"`{teacher}`" if teacher else "none"),
            ("architecture", f"{config.model_type}, hidden_size {config.hidden_size}, {config.num_hidden_layers} layers"),
            ("parameters", f"{params / 1e6:,.1f}M")]
    if "step" in summary:
        rows.append(("steps", f"{summary['step']:,} of {summary['steps']:,}"))
        rows.append(("tokens seen", f"{summary['tokens']:,}"))
    if summary.get("source"):
        rows.append(("exported from", f"`{summary['source']}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    metrics = summary.get("metrics") or {}
    terms = [k for k in ("loss", "lm", "kl", "dskd", "clone") if k in metrics]
    terms += sorted(k for k in metrics if k.startswith("clone/"))
    losses = ", ".join(f"{k} {metrics[k]:.4g}" for k in terms if isinstance(metrics[k], (int, float)))
    last = f"\nLoss terms at the last logged step: {losses}.\n" if losses else ""
    return (f"---\nlibrary_name: transformers\ntags: [lrc_dist, distillation]\n---\n\n"
            f"# {Path(teacher).name + ' student' if teacher else 'student'} ({config.hidden_size} wide)\n\n"
            f"Distilled with lrc_dist and saved as an ordinary Hugging Face checkpoint:\n"
            f"`AutoModelForCausalLM.from_pretrained(\"<this directory>\")`.\n\n| | |\n|---|---|\n{table}\n{last}")


def save_student(model: DistillationModel, out: Path, tokenizer_dir: str | None, teacher: str, summary: dict,
                 dtype: torch.dtype | None = None, max_shard_size: str = "5GB") -> None:
    """The HF student with its tokenizer files and model card in `out`."""
    export_student(model, out, tokenizer_dir, dtype, max_shard_size)
    (out / "README.md").write_text(model_card(model, teacher, summary))


def load_trained(model: DistillationModel, tensors: dict[str, torch.Tensor]) -> DistillationModel:
    """`model` (built by `build_model` in fp32) with a run's trained tensors loaded."""
    missing = set(model.trainable_state_dict()) - set(tensors)
    if missing:
        raise CheckpointDamaged(f"the trained state lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model


def export_run(cfg: TrainConfig, tensors: dict[str, torch.Tensor], out: Path, summary: dict) -> Path:
    """A run's periodic/final export: `out/hf` (the HF student) and the method's extras (LRC:
    `out/lrc`, its trainable state, what `save_lrc` writes), in the run's dtype; atomic."""
    model = load_trained(build_model(cfg, dtype=torch.float32), tensors)
    with atomic_dir(out) as tmp:
        for _, write in model.export_extras():  # the model is whole here: nothing to gather
            write(tmp, cfg.model.teacher)
        save_student(model, tmp / "hf", cfg.model.tokenizer_dir(), cfg.model.teacher, summary,
                     dtype_of(cfg.model.dtype))
    return out


# ---- any checkpoint of a run, on one process ------------------------------------------------------


def checkpoint_dir(source: Path) -> Path:
    """A checkpoint directory as is, or a run directory's latest checkpoint."""
    if (source / TRAIN_STATE).is_file():
        return source
    latest = Checkpointer(source, 1, False).latest()
    if latest is not None:
        return latest
    raise CheckpointError(f"{source} is neither a checkpoint (no {TRAIN_STATE}), a run directory (no {LATEST}), "
                            f"nor an lrc directory (no {LRC_CONFIG_FILE}).")


def read_trained_tensors(path: Path, model: DistillationModel) -> dict[str, torch.Tensor]:
    """The trainable tensors of checkpoint `path`, whatever backend wrote it, in fp32 on CPU."""
    if (path / "state").is_dir():  # DeepSpeed ZeRO (DeepSpeedBackend.save's tag)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="state", exclude_frozen_parameters=True)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.detach().clone().float() for k, v in model.trainable_state_dict().items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    return state["model"]


def export_checkpoint(source: str | Path, out_dir: str | Path, teacher: str | None = None, dtype: str = "bfloat16",
                      max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """The student of a training checkpoint (or a run dir's latest) as an HF checkpoint in `out_dir`."""
    path = checkpoint_dir(Path(source))
    state = read_train_state(path)
    problems = damage(path, state, 0, 1)
    if problems:
        name, what = sorted(problems.items())[0]
        raise CheckpointDamaged(f"{path / name}: {what}; export an earlier checkpoint of the run instead.")
    cfg = config_of(state["config"], str(path / TRAIN_STATE))
    if teacher:
        cfg.model.teacher = teacher
    if cfg.model.method != "lm":
        check_teacher(cfg.model.teacher, state.get("teacher_fingerprint"), path / TRAIN_STATE)
    model = build_model(cfg, dtype=torch.float32)
    load_trained(model, read_trained_tensors(path, model))
    summary = {"method": cfg.model.method, "step": state["step"], "steps": cfg.steps, "source": str(path.resolve()),
               "tokens": state["consumed_samples"] * cfg.data.seq_len, "metrics": state.get("metrics")}
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        save_student(model, tmp, cfg.model.tokenizer_dir(), cfg.model.teacher, summary, dtype_of(dtype), max_shard_size)
    return Path(out_dir)


def main(source: str, out_dir: str, teacher: str | None = None, dtype: str = "bfloat16", max_shard_size: str = "5GB",
         overwrite: bool = False) -> None:
    """Export the student of SOURCE (a run dir, a checkpoint step_N of any backend, or an lrc dir)
    as a Hugging Face model in OUT_DIR. --teacher overrides the teacher dir recorded at training time."""
    torch_dtype = dtype_of(dtype)
    src = Path(source)
    if (src / LRC_CONFIG_FILE).is_file():
        teacher_dir = teacher or read_lrc_meta(src)["teacher"]
        model = load_lrc(src, teacher_path=teacher_dir)
        with atomic_dir(Path(out_dir), overwrite) as tmp:
            save_student(model, tmp, teacher_dir, teacher_dir, {"source": str(src.resolve())}, torch_dtype, max_shard_size)
    else:
        export_checkpoint(src, out_dir, teacher, dtype, max_shard_size, overwrite)
    print(f"exported the student to {out_dir}")


def cli() -> None:
    """`lrc-export` / `python -m lrc_dist.export`: bad input is one message and exit code 2."""
    try:
        fire.Fire(main, name="lrc-export")
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()

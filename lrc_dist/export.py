"""Export a student as an ordinary Hugging Face checkpoint.

    python -m lrc_dist.export SOURCE OUT_DIR [--dtype bfloat16] [--teacher DIR] [--max_shard_size 5GB] [--overwrite]

SOURCE is any of:
- a run directory (`checkpoint.dir`): its latest checkpoint;
- a checkpoint `RUN_DIR/step_N` of any backend (none or FSDP: DCP; DeepSpeed: ZeRO), read on
  one process, without torchrun;
- an `lrc` directory written by `lrc_dist.lrc_files.save_lrc` (e.g. `RUN_DIR/export_N/lrc`).

The student is materialised a part at a time (a layer, the embedding, the head; LRC: W_T @ P etc.,
in fp32) and saved in the teacher's architecture with hidden_size = d_S, an explicit head_dim (it no
longer equals hidden_size / heads), the student's rms_norm_eps and tie flag, the tokenizer files and
a model card (README.md), so that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` just works. The
trainer's exports (`export_run`) materialise the model it holds, gathering one part at a time from
its backend, instead of building it again from disk. OUT_DIR appears complete or not at all:
it is written beside itself and renamed into place, with the umask's usual modes (0644 files).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import fire
import torch
from huggingface_hub import save_torch_state_dict
from torch import Tensor, nn
from transformers import PretrainedConfig

from lrc_dist.build import build_model, dtype_of, load_lrc
from lrc_dist.checkpoint import LATEST, TRAIN_STATE, Checkpointer, CheckpointDamaged, damage, read_train_state
from lrc_dist.config import TrainConfig, config_of
from lrc_dist.interface import DistillationModel, StudentPart
from lrc_dist.lrc_files import LRC_CONFIG_FILE, check_teacher, read_lrc_meta
from lrc_dist.model import CheckpointError
from lrc_dist.parallel import full_tensors

# Files that make up a tokenizer (and generation defaults) in an HF checkpoint directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

# `backend.gathered` or `parallel.full_tensors` of a model: {name: full value} of some parameters.
Gather = Callable[[list[str]], contextlib.AbstractContextManager[dict[str, Tensor]]]


# ---- materialising the student, one part at a time ------------------------------------------------


@contextlib.contextmanager
def replaced_parameters(model: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Within the block, the parameters of `model` named in `values` hold these values, in fp32
    (an export's parts read them like any parameter); the module's own parameter objects (FSDP2's
    DTensor shards, ZeRO-3's partitions) are put back afterwards, untouched."""
    owners = [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in values]
    saved = [getattr(m, attr) for m, attr in owners]
    try:
        for (m, attr), p, t in zip(owners, saved, values.values()):
            setattr(m, attr, nn.Parameter(t.float(), requires_grad=p.requires_grad))  # trainable stays so
        yield
    finally:
        for (m, attr), p in zip(owners, saved):
            setattr(m, attr, p)


@contextlib.contextmanager
def full_parameters(model: nn.Module, gathered: Gather, names: list[str], is_main: bool) -> Iterator[None]:
    """`replaced_parameters` by the full values of the parameters `names` on the main rank. Every
    rank enters: the gather is collective."""
    with gathered(names) as full, replaced_parameters(model, full if is_main else {}):
        yield


def gathered_to_cpu(gathered: Gather, names: list[str], is_main: bool) -> dict[str, Tensor]:
    """{name: full value, on CPU} of the parameters `names` on the main rank ({} elsewhere),
    gathered one at a time (collective)."""
    values = {}
    for name in names:
        with gathered([name]) as full:
            if is_main:
                values[name] = full[name].to("cpu", copy=True)  # ZeRO-3 frees the gathered storage
    return values


def part_tensors(model: nn.Module, parts: Iterator[StudentPart], gathered: Gather, convert: Callable[[Tensor], Tensor],
                 is_main: bool = True) -> dict[str, Tensor]:
    """{name: convert(tensor)} of every part's tensors (`student_parts`, `dense_parts`), each part
    computed in fp32 from the full values of the parameters it names: at most one part's
    parameters are gathered at a time. Collective when `gathered` is; only where `is_main` are
    they computed ({} elsewhere). `convert` makes tensors of their own (a part may return views)."""
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        for names, part in parts:
            with full_parameters(model, gathered, names, is_main):
                if is_main:
                    state.update({k: convert(v) for k, v in part().items()})
    return state


def student_tensors(model: DistillationModel, gathered: Gather, dtype: torch.dtype, is_main: bool = True
                    ) -> dict[str, Tensor]:
    """The student's Hugging Face tensors, on CPU in `dtype`, computed in fp32 part by part
    (`part_tensors` of `student_parts`). Collective when `gathered` is; only on the main rank are
    they computed ({} elsewhere)."""
    # tensors of their own: safetensors refuses views (ZeRO-1/2 keeps flat buffers)
    return part_tensors(model, model.student_parts(), gathered,
                        lambda v: v.to("cpu", dtype, copy=True, memory_format=torch.contiguous_format), is_main)


# ---- writing an export ------------------------------------------------------------------------------


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


def model_card(config: PretrainedConfig, state: dict[str, Tensor], teacher: str, summary: dict) -> str:
    """README.md of an export: what was distilled from what, how far, and the last loss terms."""
    method = summary.get("method", "lrc")
    params = sum(t.numel() for t in state.values())
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


def save_student(state: dict[str, Tensor], config: PretrainedConfig, out: Path, tokenizer_dir: str | Path | None,
                 max_shard_size: str = "5GB", card: str | None = None) -> Path:
    """A standard HF checkpoint in `out`: `config`, the weights `state`, the tokenizer files found
    in `tokenizer_dir` and, when given, the model card."""
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = next(iter(state.values())).dtype
    config.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, out / name)
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def export_student(model: DistillationModel, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                   dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB", teacher: str | None = None,
                   summary: dict | None = None) -> Path:
    """The student of `model`, held whole by this one process, as a standard HF checkpoint in
    `out_dir`; with a model card when `summary` (and the teacher dir) are given. Returns the path."""
    state = student_tensors(model, functools.partial(full_tensors, model), dtype)
    config = model.student_hf_config()
    card = model_card(config, state, teacher or "", summary) if summary is not None else None
    return save_student(state, config, Path(out_dir), tokenizer_dir, max_shard_size, card)


def load_trained(model: DistillationModel, tensors: dict[str, torch.Tensor]) -> DistillationModel:
    """`model` (built by `build_model` in fp32) with a run's trained tensors loaded."""
    missing = set(model.trainable_state_dict()) - set(tensors)
    if missing:
        raise CheckpointDamaged(f"the trained state lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model


def export_run(model: DistillationModel, backend, cfg: TrainConfig, out: Path, summary: dict) -> Path:
    """A run's periodic/final export from the model being trained (no teacher read from disk):
    `out/hf`, the HF student in the run's dtype with its model card, and the method's extras
    (LRC: `out/lrc`, its trainable state); atomic. Collective: every rank takes part in the
    gathers, one part of the model at a time; the main rank computes and writes."""
    is_main = backend.info.is_main
    with (atomic_dir(out) if is_main else contextlib.nullcontext()) as tmp:
        for names, write in model.export_extras():  # on CPU: LRC's trainable state is large (7B -> 2048: 6 GB)
            with replaced_parameters(model, gathered_to_cpu(backend.gathered, names, is_main)):
                if is_main:
                    write(tmp, cfg.model.teacher)
        state = student_tensors(model, backend.gathered, dtype_of(cfg.model.dtype), is_main)
        if is_main:
            config = model.student_hf_config()
            save_student(state, config, tmp / "hf", cfg.model.tokenizer_dir(),
                         card=model_card(config, state, cfg.model.teacher, summary))
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
    model = build_model(cfg, dtype=torch.float32, trained=True, dense=state.get("dense", False))
    load_trained(model, read_trained_tensors(path, model))
    summary = {"method": cfg.model.method, "step": state["step"], "steps": cfg.steps, "source": str(path.resolve()),
               "tokens": state["consumed_samples"] * cfg.data.seq_len, "metrics": state.get("metrics")}
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        export_student(model, tmp, cfg.model.tokenizer_dir(), dtype_of(dtype), max_shard_size, cfg.model.teacher, summary)
    return Path(out_dir)


def main(source: str, out_dir: str, teacher: str | None = None, dtype: str = "bfloat16", max_shard_size: str = "5GB",
         overwrite: bool = False) -> None:
    """Export the student of SOURCE (a run dir, a checkpoint step_N of any backend, or an lrc dir)
    as a Hugging Face model in OUT_DIR. --teacher overrides the teacher dir recorded at training time."""
    torch_dtype = dtype_of(dtype)
    src = Path(source)
    if (src / LRC_CONFIG_FILE).is_file():
        meta = read_lrc_meta(src)
        teacher_dir = teacher or meta["teacher"]
        model = load_lrc(src, teacher_path=teacher_dir)
        tokenizer_dir = meta.get("student_tokenizer") or teacher_dir  # across tokenizers: the student's own
        with atomic_dir(Path(out_dir), overwrite) as tmp:
            export_student(model, tmp, tokenizer_dir, torch_dtype, max_shard_size, teacher_dir,
                           {"source": str(src.resolve())})
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

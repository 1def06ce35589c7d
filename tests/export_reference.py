"""The trainer's export as it was before it exported the live model: the model
built again from disk in fp32, the trained tensors loaded, the student materialised at once
(`student_state_dict`). The live export must write the very same files."""

from pathlib import Path

import torch

from lrc_dist.build import build_model, dtype_of
from lrc_dist.checkpoint import read_train_state
from lrc_dist.config import TrainConfig, config_of
from lrc_dist.export import atomic_dir, load_trained, model_card, read_trained_tensors, save_student
from lrc_dist.lrc_files import save_lrc


def export_from_disk(cfg: TrainConfig, tensors: dict[str, torch.Tensor], out: Path, summary: dict,
                     dense: bool = False) -> Path:
    """What `export_run(cfg, tensors, out, summary)` wrote: `out/hf` and, for LRC, `out/lrc`
    (`dense`: of LRC's dense phase)."""
    model = load_trained(build_model(cfg, dtype=torch.float32, trained=True, dense=dense), tensors)
    with atomic_dir(out) as tmp:
        if cfg.model.method == "lrc":
            save_lrc(model, tmp / "lrc", cfg.model.teacher)
        state = {k: v.to(dtype_of(cfg.model.dtype)) for k, v in model.student_state_dict().items()}
        config = model.student_hf_config()
        save_student(state, config, tmp / "hf", cfg.model.tokenizer_dir(),
                     card=model_card(config, state, cfg.model.teacher, summary))
    return out


def assert_export_as_from_disk(run_dir: Path, step: int, scratch: Path) -> None:
    """`run_dir/export_N` holds, byte for byte, what the export from disk writes from checkpoint
    `step_N` (taken at the same step) of the run."""
    path = Path(run_dir) / f"step_{step:08d}"
    saved = read_train_state(path)
    cfg = config_of(saved["config"], str(path))
    dense = saved.get("dense", False)
    tensors = read_trained_tensors(path, build_model(cfg, dtype=torch.float32, trained=True, dense=dense))
    summary = {"method": cfg.model.method, "step": saved["step"], "steps": cfg.steps, "metrics": saved["metrics"],
               "tokens": saved["consumed_samples"] * cfg.data.seq_len}
    want = export_from_disk(cfg, tensors, Path(scratch) / f"from_disk_{step}", summary, dense)
    got = Path(run_dir) / f"export_{step:08d}"
    files = sorted(str(p.relative_to(want)) for p in want.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert "hf/model.safetensors" in files and ("lrc/lrc_trainable.safetensors" in files) == (cfg.model.method == "lrc")
    for name in files:
        assert (got / name).read_bytes() == (want / name).read_bytes(), f"{got / name} differs from the export from disk"

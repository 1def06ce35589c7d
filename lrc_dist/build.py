"""From a training config to the distillation model it trains (`model.method`) and the sample stream
it trains on: the trainer, the export of a checkpoint and the tests all build them here,
identically on every rank. The trainer, the backends and the export see the model only as an
`interface.DistillationModel`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from lrc_dist.align import TeacherRetokenizer, vocab_overlap
from lrc_dist.config import TrainConfig
from lrc_dist.data import PackedMixture, TokenSet
from lrc_dist.dskd import projector_lr_scale
from lrc_dist.indexed_dataset import Manifest, tokenizer_sha256
from lrc_dist.interface import DistillationModel
from lrc_dist.kd import KnowledgeDistillation, build_student, student_like
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LowRankClone
from lrc_dist.lrc_config import LRCConfig
from lrc_dist.lrc_files import LRC_CONFIG_FILE, LRC_WEIGHTS_FILE, check_teacher, read_lrc_meta
from lrc_dist.model import CausalLM, CheckpointError
from lrc_dist.projection_init import CALIBRATED, init_from_teacher
from lrc_dist.vocab import StudentVocab


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"{name!r} is not a floating-point torch dtype lrc_dist takes; use bfloat16, float16 or "
                         f"float32.")
    return dtype


def init_projections(clone: LowRankClone, cfg: TrainConfig, device: torch.device | None, trained: bool) -> None:
    """`lrc.init`; only the cheap random placeholder when trained projections are loaded next. An
    informed init whose student starts further from the teacher than the random init's (`start_kl`
    on the calibration windows: two forwards over them) is replaced by the random init, and the run
    says so."""
    init = cfg.model.lrc.init
    if trained or init == "random":
        clone.init_weights(cfg.seed)
        return
    windows = calibration_windows(cfg, clone.vocab_size) if init in CALIBRATED else None
    init_from_teacher(clone.to(device) if device is not None else clone, windows, cfg.micro_batch_size)
    if windows is None or clone.cross_tokenizer:  # the windows are the teacher's tokens there
        return
    batch = cfg.micro_batch_size
    informed, kl = {k: v.clone() for k, v in clone.trainable_state_dict().items()}, start_kl(clone, windows, batch)
    clone.init_weights(cfg.seed)
    random_kl = start_kl(clone, windows, batch)
    if kl <= random_kl:
        clone.load_state_dict(informed, strict=False)
    elif not dist.is_initialized() or dist.get_rank() == 0:
        print(f"lrc.init={init}: the student starts further from the teacher than lrc.init=random's (KL {kl:.2f} "
              f"against {random_kl:.2f} at T = 1 on the {len(windows)} calibration windows): falling back to "
              f"lrc.init=random. Set lrc.init yourself to silence this.", flush=True)


@torch.no_grad()
def start_kl(clone: LowRankClone, windows: torch.Tensor, batch_size: int = 1) -> float:
    """KL(teacher || student) at T = 1, the mean over the tokens of windows [n, T] (`batch_size` a
    forward), the max over ranks (all ranks take the same branch of `init_projections`). All of
    the init's calibration windows: on Gemma-3-270M the first two alone ranked `activation` behind
    `random` (KL 10.24 against 10.19), all 16 ahead (9.31 against 10.09)."""
    cfg = LossConfig(lm_weight=0.0, kl_weight=1.0, clone_weight=0.0, temperature=1.0)
    kl = sum(clone(w[:, :-1], w[:, 1:], cfg, normalizer=windows[:, 1:].numel())[1]["kl"]
             for w in windows.split(batch_size)).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(kl, op=dist.ReduceOp.MAX)
    return float(kl)


def build_model(cfg: TrainConfig, dtype: torch.dtype | None = None, device: torch.device | None = None,
                trained: bool = False, dense: bool = False, dense_state: dict[str, torch.Tensor] | None = None
                ) -> DistillationModel:
    """The model of `cfg.model.method`, initialised identically on every rank (same seed, same data).
    LRC's projections start as `lrc.init` says; an init from the teacher moves the model to
    `device` first and runs there. With `trained` (a resume, an export: a trained state is loaded
    over the model) they get only the cheap random init, and nothing is computed. `dense`: LRC in
    its dense phase (`LowRankClone.densify`), its tensors taken from `dense_state` (what the
    switch computed) or zeros, for a trained state loaded next."""
    m = cfg.model
    dtype = dtype or dtype_of(m.dtype)
    if m.method == "lm":
        if not m.student:
            raise ValueError("model.method=lm trains model.student: pass a checkpoint dir with its config.json.")
        return KnowledgeDistillation(build_student(m.student, cfg.seed))
    if not m.teacher:
        raise ValueError("model.teacher is not set: pass the directory of a local Hugging Face checkpoint.")
    teacher = CausalLM.from_pretrained(m.teacher, dtype=dtype)
    if m.method == "kd":
        student = build_student(m.student, cfg.seed) if m.student else student_like(
            teacher, m.lrc.student_hidden_size, cfg.seed)
        overlap = vocab_overlap(m.teacher, m.student) if m.cross_tokenizer() else None
        model = KnowledgeDistillation(student, teacher, overlap)
    else:
        model = LowRankClone(teacher, m.lrc, StudentVocab.load(m.teacher, m.student) if m.cross_tokenizer() else None)
    if cfg.data.document_mask:
        model.set_document_mask(Manifest.read(Path(cfg.data.paths[0]) / "manifest.json").tokenizer["eos_id"])
    if m.method == "lrc":  # after the mask: a calibration forward reads documents as training does
        init_projections(model, cfg, device, trained)
    if cfg.loss.dskd_weight:
        model.enable_dual_space()
        scale = cfg.optim.dskd_projector_lr_scale
        model.dual_space.lr_scale = projector_lr_scale(model) if scale is None else scale
    if dense:
        if not trained:
            raise ValueError("build_model(dense=True) builds a model for a trained state of the dense phase: pass "
                             "trained=True (the trainer enters the phase by LowRankClone.densify).")
        model.densify(dense_state or {})
    return model


def training_mixture(cfg: TrainConfig, vocab_size: int) -> PackedMixture:
    """The run's sample stream (`cfg.data`), its token sets checked against the model's vocabulary and
    tokenizer; sample i is the same whatever the world size (lrc_dist.data)."""
    d = cfg.data
    if not d.paths:
        raise ValueError("data.paths is empty: pass token-set directories written by data_prep/tokenize.py.")
    sets = [TokenSet.open(p, verify=d.verify) for p in d.paths]
    for token_set in sets:
        token_set.check_teacher(vocab_size, cfg.model.tokenizer_dir())
    return PackedMixture(sets, d.mixture_weights() or [1.0] * len(sets), d.seq_len, seed=d.seed,
                         num_samples=cfg.steps * cfg.global_batch_size)


def calibration_windows(cfg: TrainConfig, vocab_size: int) -> torch.Tensor:
    """The input tokens [lrc.init_samples, seq_len] of the run's first samples (all of them if the run
    has fewer), the same on every rank whatever the world size: the projection init's calibration data.
    Across tokenizers: the teacher's tokens of their text, as many per window as the shortest has
    (no padding enters the statistics)."""
    mixture = training_mixture(cfg, vocab_size)
    windows = torch.stack([mixture[i] for i in range(min(cfg.model.lrc.init_samples, len(mixture)))])
    if cfg.model.cross_tokenizer():  # the teacher's stream: its tokens of the same text, cut to the shortest row
        teacher = TeacherRetokenizer(cfg.model.student, cfg.model.teacher, teacher_max_len(cfg))(windows)
        return teacher["teacher_input_ids"][:, : int((teacher["teacher_labels"] != -100).sum(1).min())]
    return windows[:, :-1]


def teacher_max_len(cfg: TrainConfig) -> int:
    """Across tokenizers: the most teacher tokens a window's text may take (data.teacher_max_len)."""
    return cfg.data.teacher_max_len or 2 * cfg.data.seq_len


def load_lrc(path: str | Path, teacher_path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LowRankClone:
    """Rebuild a saved LRC model; `teacher_path` overrides the teacher directory recorded at save time."""
    path = Path(path)
    meta = read_lrc_meta(path)
    teacher = teacher_path or meta["teacher"]
    check_teacher(teacher, meta.get("teacher_fingerprint"), path / LRC_CONFIG_FILE)
    vocab = None
    if meta.get("student_tokenizer"):
        tokenizer = Path(meta["student_tokenizer"])
        if not (tokenizer / "tokenizer.json").is_file() or tokenizer_sha256(
                tokenizer / "tokenizer.json") != meta["student_tokenizer_sha256"]:
            raise CheckpointError(f"{path / LRC_CONFIG_FILE}: the student's tokenizer {tokenizer / 'tokenizer.json'} "
                                  f"is missing or not the one it was trained with (sha256 "
                                  f"{meta['student_tokenizer_sha256'][:12]}); put it back there.")
        vocab = StudentVocab.load(teacher, tokenizer)
    model = LowRankClone(CausalLM.from_pretrained(teacher, dtype=dtype), LRCConfig(**meta["lrc"]), vocab)
    if meta.get("dense"):
        model.densify({})
    try:
        state = {k: v.to(dtype) for k, v in load_file(str(path / LRC_WEIGHTS_FILE)).items()}
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{path / LRC_WEIGHTS_FILE} cannot be read ({e}): it is missing, truncated or "
                              f"corrupt.") from None
    expected = model.trainable_state_dict()
    if set(state) != set(expected):
        raise CheckpointError(f"{path / LRC_WEIGHTS_FILE} does not fit teacher {meta['teacher']}: "
                              f"missing {sorted(set(expected) - set(state))[:5]}, extra {sorted(set(state) - set(expected))[:5]}.")
    model.load_state_dict(state, strict=False)
    return model

"""LRC training (and its baselines, `model.method: kd | lm`): build -> parallelize -> resume ->
loop -> checkpoint/export.

    torchrun --nproc_per_node=8 -m lrc_dist.train configs/lrc_qwen7b.yaml --optim.lr=1e-4 ...
    python -m lrc_dist.train configs/tiny_cpu.yaml --parallel.backend=none     # one process

One optimizer step consumes `global_batch_size` sequences: `micro_batch_size` per rank per forward,
accumulated `global_batch_size / (micro_batch_size * world_size)` times. Losses are normalised by
the step's global count of labelled tokens, so any world size gives the same step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import fire
import torch
import torch.distributed as dist

from lrc_dist.align import TeacherRetokenizer, vocab_overlap
from lrc_dist.checkpoint import Checkpointer
from lrc_dist.config import TrainConfig, load_config, to_dict
from lrc_dist.data import DistributedBatches, PackedMixture, TokenSet
from lrc_dist.export import export_student
from lrc_dist.kd import KnowledgeDistillation, build_student, student_like
from lrc_dist.lrc import LowRankClone, save_lrc
from lrc_dist.metrics import MetricsLogger, memory_gb, peak_flops
from lrc_dist.model import CausalLM
from lrc_dist.parallel import DistillationModel, DistInfo, build_backend, dtype_of, init_distributed


class NonFiniteLossError(RuntimeError):
    pass


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup, then linear decay (paper) or cosine, to min_lr_ratio * lr at the last step."""
    o = cfg.optim
    warmup = int(o.warmup * cfg.steps) if o.warmup < 1 else int(o.warmup)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(cfg.steps - warmup, 1)
    if o.schedule == "linear":
        decay = 1.0 - progress
    elif o.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.schedule={o.schedule!r}; use linear or cosine.")
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_pass = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_pass:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be a multiple of micro_batch_size * "
                         f"world_size = {cfg.micro_batch_size} * {world_size}.")
    return cfg.global_batch_size // per_pass


def build_model(cfg: TrainConfig, dtype: torch.dtype | None = None) -> DistillationModel:
    """The model of `cfg.model.method`, initialised identically on every rank (same seed)."""
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
        model = LowRankClone(teacher, m.lrc)
        model.init_weights(cfg.seed)
    if cfg.loss.dskd_weight:
        model.enable_dual_space()
    return model


def build_batches(cfg: TrainConfig, vocab_size: int, rank: int, world_size: int, consumed_samples: int,
                  cross_tokenizer: bool = False):
    """This rank's micro-batches of the run's sample stream, from `consumed_samples` on; with
    `cross_tokenizer`, each also carries the teacher's tokens and the aligned positions."""
    d = cfg.data
    if not d.paths:
        raise ValueError("data.paths is empty: pass token-set directories written by data_prep/tokenize.py.")
    sets = [TokenSet.open(p, verify=d.verify) for p in d.paths]
    tokenizer = Path(cfg.model.tokenizer_dir()) / "tokenizer.json"
    for token_set in sets:
        token_set.check_teacher(vocab_size, tokenizer.parent if tokenizer.is_file() else None)
    mixture = PackedMixture(sets, d.weights or [1.0] * len(sets), d.seq_len, seed=d.seed,
                            num_samples=cfg.steps * cfg.global_batch_size)
    batches = iter(DistributedBatches(mixture, cfg.micro_batch_size, rank, world_size, consumed_samples))
    if not cross_tokenizer:
        return batches
    retokenize = TeacherRetokenizer(cfg.model.student, cfg.model.teacher, d.teacher_max_len or 2 * d.seq_len)

    def with_teacher_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adds the teacher's tokens of the window's text and the aligned positions."""
        windows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)  # packed: no -100 labels
        teacher = retokenize(windows)
        return batch | {k: teacher[k] for k in ("teacher_input_ids", "align_student", "align_teacher", "align_mask")}

    return map(with_teacher_tokens, batches)


def all_reduce_sum(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    packed = torch.stack([values[k].float().to(device) for k in keys])
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def export_to(path: Path, backend, cfg: TrainConfig, info: DistInfo) -> None:
    """Save the trainable state (save_lrc format) and the HF student under `path` (rank 0 writes)."""
    state = backend.full_trainable_state()  # collective: every rank takes part
    if info.is_main:
        model = build_model(cfg, dtype=torch.float32)
        missing = set(model.trainable_state_dict()) - set(state)
        if missing:
            raise RuntimeError(f"export: the gathered state lacks {sorted(missing)[:5]}")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if isinstance(model, LowRankClone):
            save_lrc(model, path / "lrc", cfg.model.teacher)
        export_student(model, path / "hf", cfg.model.tokenizer_dir(), dtype=dtype_of(cfg.model.dtype))
        print(f"exported student to {path / 'hf'}", flush=True)
    dist.barrier()


def train(cfg: TrainConfig) -> dict[str, float]:
    info = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    grad_accum = grad_accum_steps(cfg, info.world_size)
    run_dir = Path(cfg.checkpoint.dir)

    model = build_model(cfg)
    backend = build_backend(model, cfg, info, grad_accum)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, info.is_main)
    state = {"step": 0, "consumed_samples": 0, "bad_steps": 0}
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        state = {k: v for k, v in checkpointer.load(latest, backend).items() if k in state}
        if info.is_main:
            print(f"resumed from {latest} at step {state['step']}", flush=True)

    cross_tokenizer = model.cross_tokenizer
    batches = build_batches(cfg, model.vocab_size, info.rank, info.world_size, state["consumed_samples"],
                            cross_tokenizer)
    tokens_per_forward = cfg.micro_batch_size * cfg.data.seq_len
    model_flops = model.flops_per_token(cfg.data.seq_len, tokens_per_forward)
    peak = peak_flops(info.device, cfg.log.peak_tflops)
    logger = MetricsLogger(run_dir, info.is_main, cfg.log.wandb_project, cfg.log.wandb_mode, cfg.log.run_name,
                           to_dict(cfg))
    history: dict[str, float] = {}
    tick, tokens_since = time.perf_counter(), 0
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    while state["step"] < last:
        step = state["step"]
        lr = lr_at(step, cfg)
        backend.set_lr(lr)
        micro = [next(batches) for _ in range(grad_accum)]
        local = {"tokens": sum((m["labels"] != -100).sum() for m in micro)}
        if cross_tokenizer:  # the aligned KD terms are means over the step's aligned pairs
            local["aligned"] = sum(m["align_mask"].sum() for m in micro)
        counts = all_reduce_sum(local, info.device)
        normalizer = counts["tokens"]
        sums: dict[str, torch.Tensor] = {}
        poisoned = False
        for m in micro:
            inputs = {k: v.to(info.device) for k, v in m.items()}
            if cross_tokenizer:
                inputs["aligned_normalizer"] = counts["aligned"]
            loss, metrics = backend.model(loss_cfg=cfg.loss, normalizer=normalizer, **inputs)
            finite = torch.isfinite(loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # one rank's NaN poisons the whole step
            if finite.item() < 1:
                poisoned = True
                backend.skip_micro(loss)
                continue
            backend.backward(loss * info.world_size)  # backends average over ranks; we want the sum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        if poisoned:
            backend.skip_step()
            state["bad_steps"] += 1
            if info.is_main:
                print(f"step {step}: non-finite loss, step skipped ({state['bad_steps']} in a row)", flush=True)
            if state["bad_steps"] >= cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"{state['bad_steps']} consecutive steps had a non-finite loss (last: step {step}); aborting. "
                    f"Lower optim.lr, check the data for corrupt samples, or resume from {checkpointer.latest()}."
                )
            grad_norm = float("nan")
        else:
            grad_norm = backend.step()
            state["bad_steps"] = 0
        state["step"] += 1
        state["consumed_samples"] += cfg.global_batch_size
        tokens_since += grad_accum * tokens_per_forward

        if not poisoned:
            history = all_reduce_sum(sums, info.device)
        if state["step"] % cfg.log.interval == 0 or state["step"] == last:
            elapsed = time.perf_counter() - tick
            tps = tokens_since / elapsed
            history.update(grad_norm=grad_norm, lr=lr, tokens_per_s_per_device=tps, memory_gb=memory_gb(info.device),
                           skipped_step=float(poisoned), mfu=tps * model_flops / peak if peak else None)
            logger.log(state["step"], history)
            tick, tokens_since = time.perf_counter(), 0
        if state["step"] % cfg.checkpoint.interval == 0 or state["step"] == last:
            checkpointer.save(state["step"], backend, {**state, "config": to_dict(cfg)})
        interval = cfg.checkpoint.export_interval
        if state["step"] == cfg.steps or (interval and state["step"] % interval == 0):
            export_to(run_dir / f"export_{state['step']:08d}", backend, cfg, info)
    logger.close()
    return history


def main(config: str | None = None, **overrides) -> None:
    """Train an LRC student. CONFIG is a YAML file or .py recipe; overrides are dotted, e.g. --optim.lr=3e-4."""
    cfg = load_config(config, overrides)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    fire.Fire(main)

"""LRC training (and its baselines, `model.method: kd | lm`): build -> parallelize -> resume ->
loop -> checkpoint/export.

    torchrun --nproc_per_node=8 -m lrc_dist.train configs/lrc_qwen7b.yaml --optim.lr=1e-4 ...
    python -m lrc_dist.train configs/tiny_cpu.yaml --parallel.backend=none     # one process

One optimizer step consumes `global_batch_size` sequences: `micro_batch_size` per rank per forward,
accumulated `global_batch_size / (micro_batch_size * world_size)` times. Losses are normalised by
the step's global count of labelled tokens, so any world size gives the same step. Step N is the
N-th optimizer step; its metrics record and its checkpoint `step_N` hold the state after it.

On a cluster (lrc_dist.cluster): rank 0 locks the run dir; SIGTERM/SIGUSR1/SIGINT stop every rank
at the next step boundary with a checkpoint (exit 75); a bad-step streak never writes checkpoints.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lrc_dist import preflight
from lrc_dist.align import TeacherRetokenizer
from lrc_dist.build import build_model, dtype_of, teacher_max_len, training_mixture
from lrc_dist.checkpoint import Checkpointer, agreed, read_train_state
from lrc_dist.cluster import EXIT_CONFIG, EXIT_DIVERGED, EXIT_LOCKED, EXIT_PREEMPTED, RunDirLocked, StopSignals, \
    die_with_launcher, lock_run_dir
from lrc_dist.config import ConfigError, TrainConfig, parse_args, resume_changes, to_dict
from lrc_dist.data import DistributedBatches
from lrc_dist.export import export_run, part_tensors
from lrc_dist.interface import DistillationModel
from lrc_dist.lrc_files import check_teacher
from lrc_dist.metrics import (AgreementWatch, MetricsLogger, add_to_interval, human, interval_means, memory_gb,
                              new_interval, peak_flops)
from lrc_dist.model import CheckpointError, teacher_fingerprint
from lrc_dist.on_policy import materialised_student, on_policy_batch, on_policy_seeds
from lrc_dist.sampling import Decoder
from lrc_dist.parallel import DistInfo, build_backend, init_distributed
from lrc_dist.resources import keep_freed_cpu_memory

SPIKE_WINDOW, SPIKE_WARMUP = 50, 10  # loss-spike guard: mean over the last 50 good steps, from the 10th on


class NonFiniteLossError(RuntimeError):
    """`max_bad_steps` bad steps (non-finite or spiking loss) in a row: the run diverged."""


class Preempted(RuntimeError):
    """A stop signal ended the run at a step boundary, after its checkpoint."""


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


ALIGNED_KEYS = ("teacher_input_ids", "align_student", "align_teacher", "align_mask")  # a batch across tokenizers
CLONE_KEYS = ("clone_student", "clone_teacher", "clone_mask")  # ... of LRC: the positions its clone terms compare


def build_batches(cfg: TrainConfig, vocab_size: int, rank: int, world_size: int, consumed_samples: int,
                  cross_tokenizer: bool = False):
    """This rank's micro-batches of the run's sample stream, from `consumed_samples` on; with
    `cross_tokenizer`, each also carries the teacher's tokens and the aligned positions."""
    mixture = training_mixture(cfg, vocab_size)
    ratio = cfg.loss.on_policy_ratio
    batches = iter(DistributedBatches(mixture, cfg.micro_batch_size, rank, world_size, consumed_samples, bool(ratio)))
    if ratio:  # the windows the student continues, and the seeds it samples them with (lrc_dist.on_policy)
        batches = ({"input_ids": b["input_ids"], "labels": b["labels"],
                    "on_policy_seeds": on_policy_seeds(b["sample_ids"], ratio, cfg.seed)} for b in batches)
    if not cross_tokenizer:
        return batches
    add = teacher_tokens(cfg)
    return (batch | add(batch["input_ids"], batch["labels"]) for batch in batches)


def teacher_tokens(cfg: TrainConfig):
    """Across tokenizers: a function of a micro-batch's (input_ids, labels) giving the teacher's tokens
    of its windows' text and the aligned positions (the batch's `ALIGNED_KEYS`, and LRC's `CLONE_KEYS`)."""
    retokenize = TeacherRetokenizer(cfg.model.student, cfg.model.teacher, teacher_max_len(cfg))
    keys = ALIGNED_KEYS + (CLONE_KEYS if cfg.model.method == "lrc" else ())

    def add(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        windows = torch.cat([input_ids, labels[:, -1:]], dim=1).cpu()  # packed (or generated): no -100 labels
        teacher = retokenize(windows)
        return {k: teacher[k] for k in keys}

    return add


def all_reduce_sum(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    packed = torch.stack([torch.as_tensor(values[k]).float().to(device) for k in keys])
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def check_resume(saved: dict, path: Path, cfg: TrainConfig, info: DistInfo) -> None:
    """Refuse, before any heavy work, a resume that would not continue the checkpoint's run."""
    changes = resume_changes(saved.get("config", {}), cfg)
    if changes:
        raise ConfigError(
            f"{path} was written with another config; changed: {'; '.join(changes)}. Resume with the checkpoint's "
            f"values, train in another checkpoint.dir, or allow these changes with "
            f"--checkpoint.allow_changes=[{','.join(c.split(':')[0] for c in changes)}] (steps, stop_at, log.*, "
            f"checkpoint.* and the device layout may always change; see config.RESUME_MAY_CHANGE).")
    if saved.get("teacher_fingerprint") and cfg.model.teacher:
        try:
            check_teacher(cfg.model.teacher, saved["teacher_fingerprint"], path)
        except CheckpointError as e:
            raise ConfigError(f"model.teacher: {e}") from None
    if cfg.loss.dskd_weight and "dskd_projector_lr_scale" not in saved.get("config", {}).get("optim", {}):
        raise ConfigError(f"{path} predates the DSKD projector's own learning rate (optim.dskd_projector_lr_scale): "
                          f"its optimizer state has another layout; start afresh in another checkpoint.dir")
    written = saved.get("world_size", info.world_size)
    if cfg.parallel.backend == "deepspeed" and written != info.world_size:
        raise ConfigError(
            f"{path} is a DeepSpeed ZeRO checkpoint of {written} ranks and this run has {info.world_size}: ZeRO's "
            f"optimizer shards only load on the world size that wrote them. Resume on {written} ranks (the DCP "
            f"checkpoints of parallel.backend=fsdp reshard to any world size).")


def export_due(step: int, cfg: TrainConfig) -> bool:
    interval = cfg.checkpoint.export_interval
    return step == cfg.steps or bool(interval and step % interval == 0)


def export_to(path: Path, model: DistillationModel, backend, cfg: TrainConfig, info: DistInfo, state: dict,
              metrics: dict) -> None:
    """The HF student (`path/hf`, with a model card) and LRC's trainable state (`path/lrc`), from the
    model being trained; atomic, rank 0 writes. Collective: every rank takes part in the gathers."""
    summary = {"method": cfg.model.method, "step": state["step"], "steps": cfg.steps, "metrics": metrics,
               "tokens": state["consumed_samples"] * cfg.data.seq_len}
    export_run(model, backend, cfg, path, summary)
    if info.is_main:
        print(f"exported student to {path / 'hf'}", flush=True)
    dist.barrier()


def parameter_counts(model: DistillationModel) -> tuple[int, int]:
    """(trainable, frozen) parameters of the model, also when ZeRO-3 has partitioned it."""
    params = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, t in params if t), sum(n for n, t in params if not t)


def startup_summary(cfg: TrainConfig, model: DistillationModel, backend, info: DistInfo, grad_accum: int, step: int) -> str:
    """What this run is, in a few lines, before its first step."""
    trainable, frozen = parameter_counts(model)
    tokens = cfg.global_batch_size * cfg.data.seq_len
    m, p = cfg.model, cfg.parallel
    width = f", student width {m.lrc.student_hidden_size}" if m.method == "lrc" else ""
    start = f"resuming after step {step:,}" if step else "starting at step 0"
    return "\n".join([
        f"lrc_dist: method {m.method}, teacher {m.teacher or 'none'}{width}",
        f"  parameters: {human(trainable)} trainable, {human(frozen)} frozen",
        f"  world size {info.world_size} ({info.device.type}), micro-batch {cfg.micro_batch_size}, gradient accumulation "
        f"{grad_accum}: {cfg.global_batch_size} sequences = {tokens:,} tokens per step",
        f"  backend {p.backend}, {backend.placement}, activation checkpointing {'on' if p.activation_checkpointing else 'off'}"
        f"{', sharded weight generation' if p.shard_generation and m.method == 'lrc' else ''}",
        f"  {cfg.steps:,} steps ({human(cfg.steps * tokens)} tokens), {start}; run dir {cfg.checkpoint.dir}",
        *dense_summary(cfg, model),
    ])


def dense_summary(cfg: TrainConfig, model: DistillationModel) -> list[str]:
    at = dense_step(cfg)
    if at is None:
        return []
    if model.dense:
        return ["  dense phase: the student's matrices are free parameters"]
    return [f"  dense phase after step {at:,} (lrc.dense_after): the student's matrices become free parameters; "
            f"P_o, P_down {'train' if cfg.model.lrc.dense_projections == 'train' else 'frozen'}"]


def projector_scale(model: DistillationModel) -> float | None:
    return model.dual_space.lr_scale if model.dual_space is not None else None


def dense_step(cfg: TrainConfig) -> int | None:
    """The step after which LRC's dense phase starts (lrc.dense_after), or None."""
    return cfg.model.lrc.dense_step(cfg.steps) if cfg.model.method == "lrc" else None


def dense_state(model: DistillationModel, backend) -> dict[str, torch.Tensor]:
    """The dense phase's tensors (`LowRankClone.dense_parts`) computed from the LRC model being
    trained, in fp32 on CPU, on every rank; a sharded model is gathered one part at a time, as an
    export gathers it (collective). Memory: the full student in fp32 on each rank's host."""
    return part_tensors(model, model.dense_parts(), backend.gathered,
                        lambda v: v.to("cpu", torch.float32, copy=True, memory_format=torch.contiguous_format))


def dense_model(cfg: TrainConfig, info: DistInfo, grad_accum: int, state: dict[str, torch.Tensor],
                projector_lr_scale: float | None):
    """(model, backend) of the dense phase, from the tensors `dense_state` computed (taken over, not
    copied): the teacher read again, a fresh optimizer (Adam's moments restart at the switch); the
    DSKD projector keeps its learning-rate scale."""
    model = build_model(cfg, device=info.device, trained=True, dense=True, dense_state=state)
    keep_projector_lr_scale(model, projector_lr_scale)
    return model, build_backend(model, cfg, info, grad_accum)


def keep_projector_lr_scale(model: DistillationModel, scale: float | None) -> None:
    """The DSKD projector's learning-rate scale of the run (set at its start from the initial
    weights, `dskd.projector_lr_scale`), for a model built again: a resume or the dense switch,
    whose placeholder weights would give another one."""
    if scale is not None and model.dual_space is not None:
        model.dual_space.lr_scale = scale


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run (or resume) the training job of `cfg`; returns the last logged metrics. Raises Preempted
    when a stop signal ended it early (with a checkpoint), NonFiniteLossError when it diverged."""
    die_with_launcher()
    info = init_distributed(cfg.device)
    if info.device.type == "cpu":
        keep_freed_cpu_memory()
    preflight.check(cfg, info.world_size, gather=True)
    with StopSignals() as stop, lock_run_dir(cfg.checkpoint.dir, info, cfg.checkpoint.lock_stale_minutes * 60):
        return _train(cfg, info, stop)


def _train(cfg: TrainConfig, info: DistInfo, stop: StopSignals) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    grad_accum = grad_accum_steps(cfg, info.world_size)
    run_dir = Path(cfg.checkpoint.dir)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, info.is_main)
    resume_from = checkpointer.resumable() if cfg.checkpoint.resume else None
    written = read_train_state(resume_from) if resume_from is not None else {}
    if resume_from is not None:
        check_resume(written, resume_from, cfg, info)

    # a resume computes no init; a checkpoint of the dense phase holds that phase's tensors
    model = build_model(cfg, device=info.device, trained=resume_from is not None, dense=written.get("dense", False))
    keep_projector_lr_scale(model, written.get("projector_lr_scale"))
    fingerprint = teacher_fingerprint(cfg.model.teacher) if cfg.model.method != "lm" else None
    backend = build_backend(model, cfg, info, grad_accum)
    state = {"step": 0, "consumed_samples": 0, "bad_steps": 0, "recent_losses": [], "interval": new_interval(),
             "dense": False}
    history: dict[str, float] = {}  # the last logged record
    if resume_from is not None:
        saved = checkpointer.load(resume_from, backend)
        state = {k: saved.get(k, v) for k, v in state.items()}
        history = saved.get("metrics") or {}
        if info.is_main:
            print(f"resumed from {resume_from} after step {state['step']}", flush=True)

    cross_tokenizer = model.cross_tokenizer
    batches = build_batches(cfg, model.vocab_size, info.rank, info.world_size, state["consumed_samples"],
                            cross_tokenizer)
    # on-policy across tokenizers: the teacher reads the generated text in its own tokens
    retokenize = teacher_tokens(cfg) if cross_tokenizer and cfg.loss.on_policy_ratio else None
    tokens_per_forward = cfg.micro_batch_size * cfg.data.seq_len
    model_flops = model.flops_per_token(cfg.data.seq_len, tokens_per_forward)
    peak = peak_flops(info.device, cfg.log.peak_tflops)
    logger = MetricsLogger(run_dir, info.is_main, cfg.log.wandb_project, cfg.log.wandb_mode, cfg.log.run_name,
                           to_dict(cfg), resume_step=state["step"])
    export_path = run_dir / f"export_{state['step']:08d}"
    if resume_from is not None and export_due(state["step"], cfg) and agreed(not export_path.is_dir()):
        export_to(export_path, model, backend, cfg, info, state, history)  # killed during (or before) it: redo
    if info.is_main:
        print(startup_summary(cfg, model, backend, info, grad_accum, state["step"]), flush=True)
    tick, tick_step, saved_at = time.perf_counter(), state["step"], time.monotonic()
    interval_flops = 0.0  # model FLOPs since the last log (the dense phase changes the count per token)
    agreement = AgreementWatch()
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    dense_at = dense_step(cfg)
    try:
        while state["step"] < last:
            if dense_at is not None and not state["dense"] and state["step"] >= dense_at:
                began, before = time.perf_counter(), parameter_counts(model)[0]
                tensors = dense_state(model, backend)
                scale = projector_scale(model)
                backend.close()
                del model, backend  # the LRC model goes before the dense one is built
                gc.collect()
                if info.device.type == "cuda":
                    torch.cuda.empty_cache()
                model, backend = dense_model(cfg, info, grad_accum, tensors, scale)
                del tensors
                model_flops = model.flops_per_token(cfg.data.seq_len, tokens_per_forward)
                state["dense"] = True
                state["recent_losses"] = []  # the spike guard: the dense phase's losses start afresh
                took = time.perf_counter() - began
                tick += took  # the switch is no training time
                if info.is_main:
                    print(f"step {state['step']}: dense phase: the student's matrices are free parameters from here "
                          f"({human(parameter_counts(model)[0])} trainable, {human(before)} before); switched in "
                          f"{took:.1f} s", flush=True)
            step = state["step"] + 1  # the step being taken
            lr = lr_at(step - 1, cfg)
            backend.set_lr(lr)
            micro = [next(batches) for _ in range(grad_accum)]
            bad, grad_norm, sums = take_step(backend, model, micro, cfg, info, state, retokenize)
            state["step"] = step
            state["consumed_samples"] += cfg.global_batch_size
            interval_flops += grad_accum * tokens_per_forward * model_flops
            if bad:
                state["bad_steps"] += 1
                state["interval"]["skipped"] += 1
                if info.is_main:
                    print(f"step {step}: {bad}, step skipped ({state['bad_steps']} bad in a row)", flush=True)
            else:
                state["bad_steps"] = 0
                step_metrics = all_reduce_sum(sums, info.device)
                if "on_policy/generation_s" in step_metrics:  # seconds per device, not summed over them
                    step_metrics["on_policy/generation_s"] /= info.world_size
                state["recent_losses"] = (state["recent_losses"] + [step_metrics["loss"]])[-SPIKE_WINDOW:]
                add_to_interval(state["interval"], {**step_metrics, "grad_norm": grad_norm})

            if step % cfg.log.interval == 0 or step == last:
                elapsed = time.perf_counter() - tick
                step_time = elapsed / (step - tick_step)
                tps = (step - tick_step) * grad_accum * tokens_per_forward / elapsed
                history = {**interval_means(state["interval"]), "lr": lr, "step_time_s": step_time,
                           "eta_s": (last - step) * step_time, "tokens_seen": state["consumed_samples"] * cfg.data.seq_len,
                           "tokens_per_s_per_device": tps, "mfu": interval_flops / elapsed / peak if peak else None,
                           "memory_gb": memory_gb(info.device)}
                if "on_policy/generation_s" in history:
                    history["on_policy/time_share"] = history["on_policy/generation_s"] / step_time
                logger.log(step, history, cfg.steps)
                warning = agreement.update(history.get("dskd/agree"))
                if warning and info.is_main:
                    print(warning, flush=True)
                state["interval"] = new_interval(state["interval"])
                tick, tick_step, interval_flops = time.perf_counter(), step, 0.0
            if state["bad_steps"] >= cfg.max_bad_steps:
                good = checkpointer.latest()
                where = f"resume from {good}, the last checkpoint before the streak," if good else "start afresh"
                raise NonFiniteLossError(
                    f"{state['bad_steps']} consecutive bad steps (non-finite or spiking loss; last: step {step}); "
                    f"aborting. Lower optim.lr, check the data for corrupt samples, and {where} (no checkpoint is "
                    f"written during such a streak; the weights of the step before it may already have diverged).")

            minutes = cfg.checkpoint.interval_minutes
            time_due = bool(minutes) and info.is_main and time.monotonic() - saved_at >= minutes * 60
            signum, time_due = stop.agree(time_due, info.device)
            if step % cfg.checkpoint.interval == 0 or step == last or time_due or signum:
                if state["bad_steps"]:
                    if info.is_main:
                        print(f"step {step}: no checkpoint during a bad-step streak; {checkpointer.latest()} "
                              f"stays the latest", flush=True)
                else:
                    checkpointer.save(step, backend, {**state, "world_size": info.world_size, "metrics": history,
                                                      "teacher_fingerprint": fingerprint, "config": to_dict(cfg),
                                                      "projector_lr_scale": projector_scale(model)})
                    saved_at = time.monotonic()
            if signum:  # the export, if due, is redone by the resumed run: preemption leaves little time
                raise Preempted(f"stopped on {signal.Signals(signum).name} after step {step}; "
                                f"{checkpointer.latest()} is the checkpoint to resume from: run the same command again.")
            if step == last and state["bad_steps"] and info.is_main:
                print(f"WARNING: the run ended in a streak of {state['bad_steps']} bad steps, without a final "
                      f"checkpoint; {checkpointer.latest()} is the last good one.", flush=True)
            if export_due(step, cfg):
                export_to(run_dir / f"export_{step:08d}", model, backend, cfg, info, state, history)
        return history
    finally:
        logger.close()


def on_policy_inputs(model: DistillationModel, gathered, micro: list[dict], cfg: TrainConfig, device: torch.device,
                     retokenize=None) -> list[dict]:
    """Per micro-batch, the inputs that replace its own once the student has continued its
    on-policy windows (input_ids, labels, lm_labels; across tokenizers the teacher's tokens of the
    new text and the aligned positions, from `retokenize`) and its on-policy "metrics". The student
    is materialised once, its parts gathered by `gathered` (collective: every rank calls), and freed
    before the step's forwards and backwards."""
    decoder = Decoder.of(materialised_student(model, gathered, dtype_of(cfg.model.dtype)))
    out = []
    for m in micro:
        ids, labels, lm_labels, metrics = on_policy_batch(m["input_ids"].to(device), m["labels"].to(device),
                                                          m["on_policy_seeds"], decoder, cfg.loss)
        out.append({"input_ids": ids, "labels": labels, "lm_labels": lm_labels, "metrics": metrics})
        if retokenize is not None and lm_labels is not None:  # the teacher reads the student's text
            out[-1].update({k: v.to(device) for k, v in retokenize(ids, labels).items()})
    return out


def take_step(backend, model: DistillationModel, micro: list[dict], cfg: TrainConfig, info: DistInfo, state: dict,
              retokenize=None) -> tuple[str | None, float, dict[str, torch.Tensor]]:
    """One optimizer step over this rank's micro-batches: (why it was skipped or None, grad norm,
    the summed metrics of this rank). Every rank skips a step that any rank finds bad. On-policy
    windows are continued by the student first, materialised once for the step (every rank);
    across tokenizers `retokenize` (`teacher_tokens`) gives the teacher its tokens of them."""
    spike_mean = (sum(state["recent_losses"]) / len(state["recent_losses"])
                  if cfg.loss_spike_factor and len(state["recent_losses"]) >= SPIKE_WARMUP else None)
    sums: dict[str, torch.Tensor] = {}
    bad = None
    # per micro-batch: its continued windows' inputs and metrics; every rank, every step (collective gathers)
    on_policy = on_policy_inputs(model, backend.gathered, micro, cfg, info.device, retokenize) \
        if cfg.loss.on_policy_ratio else [{} for _ in micro]
    step = [{**m, **continued} for m, continued in zip(micro, on_policy)]
    local = {"tokens": sum((m["labels"] != -100).sum() for m in step)}
    if "align_mask" in micro[0]:  # across tokenizers the KD (and LRC's clone) terms are means over the step's pairs
        local["aligned"] = sum(m["align_mask"].sum() for m in step)
        if "clone_mask" in micro[0]:
            local["clone_aligned"] = sum(m["clone_mask"].sum() for m in step)
    counts = all_reduce_sum(local, info.device)
    for i, (m, continued) in enumerate(zip(micro, on_policy)):
        inputs = {k: v.to(info.device) for k, v in m.items() if k != "on_policy_seeds"}
        if "aligned" in counts:
            inputs["aligned_normalizer"] = counts["aligned"]
        if "clone_aligned" in counts:
            inputs["clone_normalizer"] = counts["clone_aligned"]
        extra = continued.pop("metrics", {})
        inputs.update(continued)
        loss, metrics = backend.model(loss_cfg=cfg.loss, normalizer=counts["tokens"], **inputs)
        metrics = {**metrics, **extra}
        finite = torch.isfinite(loss.detach()).float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # one rank's NaN poisons the whole step
        if finite.item() < 1:
            bad = "non-finite loss"
        elif spike_mean is not None and i == len(micro) - 1 and bad is None:
            # before the last backward (DeepSpeed steps inside it): the step's loss over all ranks
            step_loss = all_reduce_sum({"loss": sums.get("loss", 0.0) + metrics["loss"]}, info.device)["loss"]
            if step_loss > cfg.loss_spike_factor * spike_mean:
                bad = f"loss {step_loss:.4g} > {cfg.loss_spike_factor:g} x the recent mean {spike_mean:.4g}"
        if bad:
            backend.skip_micro(loss)
            continue
        backend.backward(loss * info.world_size)  # backends average over ranks; we want the sum
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    if bad:
        backend.skip_step()
        return bad, float("nan"), sums
    return None, backend.step(), sums


def main(argv: list[str] | None = None) -> None:
    """`python -m lrc_dist.train [CONFIG] [--key=value ...]` (`--help` lists every key). Exit codes: 0
    done, 2 bad configuration, 65 diverged, 69 run dir in use, 75 preempted (rerun to resume); see
    lrc_dist.cluster. With LRC_EXIT_FILE set, rank 0 also writes its exit code there (torchrun
    reports only 0 or 1). A user error is one message from rank 0, not a traceback per rank."""
    code, message = 1, None  # 1 unless something below says otherwise
    try:
        train(parse_args(sys.argv[1:] if argv is None else argv))
        code = 0
    except ConfigError as e:
        code, message = EXIT_CONFIG, f"error: {e}"
    except Preempted as e:
        code, message = EXIT_PREEMPTED, f"preempted: {e}"
    except NonFiniteLossError as e:
        code, message = EXIT_DIVERGED, f"diverged: {e}"
    except RunDirLocked as e:
        code, message = EXIT_LOCKED, str(e)
    except SystemExit as e:  # --help (0), or an argument error of the parser
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        if dist.is_initialized():
            if code == 0:  # no rank tears its process group down while another still talks to it
                dist.barrier()
            dist.destroy_process_group()
        if rank == 0 and os.environ.get("LRC_EXIT_FILE"):
            Path(os.environ["LRC_EXIT_FILE"]).write_text(f"{code}\n")
    if code:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()

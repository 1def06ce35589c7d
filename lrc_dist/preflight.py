"""One validation pass over a training config, before anything heavy loads: every problem found,
each naming its key, raised together as a ConfigError (the trainer prints it once and exits 2).

It checks what the types of config.py cannot: counts and intervals, the batch split over the
ranks, that every path exists (teacher, student, token sets, DeepSpeed config), mixture weights
against paths, the teacher's family and the student width (its range, and whether transformers
can load a student of that width), and that each token set was made with the model's tokenizer.
It reads only small files: config.json, tokenizer.json, the token sets' manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

from lrc_dist.config import ConfigError, TrainConfig
from lrc_dist.data import misfit
from lrc_dist.families import CheckpointError, ModelArgs
from lrc_dist.indexed_dataset import Manifest
from lrc_dist.model import INVALID_CONFIG, load_config, resized_config, weight_files
from lrc_dist.resources import shipped
from lrc_dist.tokenizer_files import load_tokenizer


def check(cfg: TrainConfig, world_size: int, gather: bool = False) -> None:
    """Raise ConfigError listing every problem of `cfg` for a job of `world_size` ranks. With
    `gather` (a collective), every rank raises the problems any rank found, so that rank 0 can
    name one that only another node sees (a path missing there)."""
    found = problems(cfg, world_size)
    if gather:
        import torch.distributed as dist

        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found)
        found = list(dict.fromkeys(p for rank in everyone for p in rank))
    if found:
        raise ConfigError(found)


def problems(cfg: TrainConfig, world_size: int) -> list[str]:
    found = _ranges(cfg)
    per_pass = cfg.micro_batch_size * world_size
    if cfg.micro_batch_size >= 1 and cfg.global_batch_size % per_pass:
        found.append(f"global_batch_size={cfg.global_batch_size} must be a multiple of micro_batch_size * world size "
                     f"= {cfg.micro_batch_size} * {world_size}; e.g. {max(per_pass, cfg.global_batch_size // per_pass * per_pass)}")
    found += _models(cfg)
    found += _data(cfg)
    if cfg.parallel.backend == "deepspeed":
        found += _deepspeed(cfg.parallel.deepspeed_config)
    if cfg.model.method != "lrc" and cfg.parallel.shard_generation:
        found.append(f"parallel.shard_generation shares out LRC's weight generation; model.method={cfg.model.method} "
                     f"generates none: set it to false")
    if cfg.model.method == "lm" and cfg.loss.dskd_weight:
        found.append("loss.dskd_weight needs a teacher; model.method=lm has none: set it to 0 or use kd/lrc")
    found += _on_policy(cfg)
    lrc = cfg.model.lrc
    if lrc.dense_after is not None:
        at = lrc.dense_step(cfg.steps)
        if cfg.model.method != "lrc":
            found.append(f"model.lrc.dense_after is LRC's dense phase; model.method={cfg.model.method} trains dense "
                         f"matrices throughout: set it to null")
        elif 0 < lrc.dense_after < 1 and at == 0:
            found.append(f"model.lrc.dense_after={lrc.dense_after}: that fraction of {cfg.steps} steps rounds to step 0; "
                         f"use 0 for a dense phase from the start, or a larger fraction")
        elif at >= cfg.steps:
            found.append(f"model.lrc.dense_after={lrc.dense_after}: the dense phase would start after step {at} of a "
                         f"run of {cfg.steps} steps, i.e. never: use a smaller value, or null for no dense phase")
    if lrc.dense_lr_scale < 0:
        found.append(f"model.lrc.dense_lr_scale={lrc.dense_lr_scale} must not be negative")
    if cfg.data.document_mask and cfg.model.cross_tokenizer():
        found.append("data.document_mask is not supported across tokenizers yet (the teacher reads a re-tokenized "
                     "window): set it to false")
    return found


def _on_policy(cfg: TrainConfig) -> list[str]:
    loss, found = cfg.loss, []
    if not 0 <= loss.on_policy_ratio <= 1:
        found.append(f"loss.on_policy_ratio={loss.on_policy_ratio} must be in [0, 1]")
    if not loss.on_policy_ratio:
        return found
    if not 1 <= loss.on_policy_new_tokens <= cfg.data.seq_len:
        found.append(f"loss.on_policy_new_tokens={loss.on_policy_new_tokens} must be in 1..data.seq_len="
                     f"{cfg.data.seq_len} (the prompt is the rest of the window)")
    if loss.on_policy_temperature < 0:
        found.append(f"loss.on_policy_temperature={loss.on_policy_temperature} must not be negative (0: greedy)")
    if not 0 < loss.on_policy_top_p <= 1:
        found.append(f"loss.on_policy_top_p={loss.on_policy_top_p} must be in (0, 1]")
    if cfg.model.method == "lm":
        found.append("loss.on_policy_ratio needs a teacher to grade the student's tokens; model.method=lm has none")
    if cfg.data.document_mask:
        found.append("loss.on_policy_ratio with data.document_mask: the sampler reads a prompt as one sequence, "
                     "across its EOS tokens, while training would mask them; set one of them off")
    return found


def _deepspeed(path: str) -> list[str]:
    file = shipped(path)
    if not file.is_file():
        return [f"parallel.deepspeed_config={path} does not exist; use one of ds_configs/ (zero3.json, zero2.json, "
                f"zero3_offload.json) or your own JSON file"]
    try:
        zero = json.loads(file.read_text()).get("zero_optimization", {})
    except (json.JSONDecodeError, AttributeError) as e:
        return [f"parallel.deepspeed_config={path} is not a JSON object ({e})"]
    if zero.get("stage", 0) < 1 or zero.get("compute_grad_norm") is False:
        return [f"parallel.deepspeed_config={path}: lrc_dist needs zero_optimization.stage >= 1 with "
                f"compute_grad_norm on, so that a step with a non-finite loss can be skipped; see ds_configs/"]
    return []


def _ranges(cfg: TrainConfig) -> list[str]:
    at_least = {"steps": (cfg.steps, 1), "micro_batch_size": (cfg.micro_batch_size, 1),
                "global_batch_size": (cfg.global_batch_size, 1), "data.seq_len": (cfg.data.seq_len, 1),
                "checkpoint.interval": (cfg.checkpoint.interval, 1), "checkpoint.keep": (cfg.checkpoint.keep, 1),
                "checkpoint.export_interval": (cfg.checkpoint.export_interval, 0), "log.interval": (cfg.log.interval, 1),
                "max_bad_steps": (cfg.max_bad_steps, 1), "optim.warmup": (cfg.optim.warmup, 0),
                "optim.grad_clip": (cfg.optim.grad_clip, 0), "loss.skew": (cfg.loss.skew, 0),
                "model.lrc.init_samples": (cfg.model.lrc.init_samples, 1)}
    optional = {"stop_at": (cfg.stop_at, 1), "loss.chunk_tokens": (cfg.loss.chunk_tokens, 1),
                "data.teacher_max_len": (cfg.data.teacher_max_len, 1)}
    positive = {"optim.lr": cfg.optim.lr, "loss.temperature": cfg.loss.temperature,
                "loss.dskd_temperature": cfg.loss.dskd_temperature,
                "checkpoint.interval_minutes": cfg.checkpoint.interval_minutes,
                "checkpoint.lock_stale_minutes": cfg.checkpoint.lock_stale_minutes, "log.peak_tflops": cfg.log.peak_tflops}
    found = [f"{k}={v} must be at least {low}" for k, (v, low) in at_least.items() if v < low]
    found += [f"{k}={v} must be at least {low} (or null)" for k, (v, low) in optional.items() if v is not None and v < low]
    found += [f"{k}={v} must be positive" for k, v in positive.items() if v is not None and v <= 0]
    weights = {"loss.lm_weight": cfg.loss.lm_weight, "loss.kl_weight": cfg.loss.kl_weight,
               "loss.clone_weight": cfg.loss.clone_weight, "loss.dskd_weight": cfg.loss.dskd_weight,
               "optim.weight_decay": cfg.optim.weight_decay}
    found += [f"{k}={v} must not be negative" for k, v in weights.items() if v < 0]
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        found.append(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if cfg.optim.warmup >= 1 and cfg.optim.warmup != int(cfg.optim.warmup):
        found.append(f"optim.warmup={cfg.optim.warmup}: a step count (>= 1) must be whole; a fraction is < 1")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        found.append(f"optim.betas={list(cfg.optim.betas)}: each must be in [0, 1)")
    if cfg.optim.eps < 0:
        found.append(f"optim.eps={cfg.optim.eps} must not be negative")
    if cfg.optim.dskd_projector_lr_scale is not None and cfg.optim.dskd_projector_lr_scale <= 0:
        found.append(f"optim.dskd_projector_lr_scale={cfg.optim.dskd_projector_lr_scale} must be positive (or null)")
    if cfg.loss_spike_factor is not None and cfg.loss_spike_factor <= 1:
        found.append(f"loss_spike_factor={cfg.loss_spike_factor} must exceed 1 (or be null: off)")
    return found


def _hf_config(key: str, path: str, found: list[str]):
    """The HF config of checkpoint dir `path` (config.json only), or None with a problem noted."""
    if not Path(path).is_dir():
        found.append(f"{key}={path} does not exist; pass a local Hugging Face checkpoint directory")
        return None
    try:
        config = load_config(path)
        ModelArgs.from_hf(config, str(Path(path) / "config.json"))
        if key == "model.teacher":
            weight_files(path)  # a teacher without (usable) weights fails now, not after the others load
        return config
    except CheckpointError as e:
        found.append(f"{key}: {e}")
        return None


def _models(cfg: TrainConfig) -> list[str]:
    m, found = cfg.model, []
    if m.method == "lm":
        if not m.student:
            found.append("model.student is required for model.method=lm: the checkpoint dir of the model to train")
        else:
            _hf_config("model.student", m.student, found)
        return found
    if not m.teacher:
        return found + ["model.teacher is not set: pass the directory of a local Hugging Face checkpoint"]
    teacher = _hf_config("model.teacher", m.teacher, found)
    if m.student and m.method == "lrc":
        if not (Path(m.student) / "tokenizer.json").is_file():
            found.append(f"model.student={m.student} has no tokenizer.json: for model.method=lrc it names the "
                         f"student's own tokenizer (LRC across tokenizers); unset it to keep the teacher's")
        elif not (Path(m.teacher) / "tokenizer.json").is_file():
            found.append(f"model.student: LRC across tokenizers re-tokenizes the text for the teacher, but "
                         f"{m.teacher} has no tokenizer.json")
    elif m.student:
        _hf_config("model.student", m.student, found)
    if teacher is None or (m.method == "kd" and m.student):
        return found
    d_s, d_t = m.lrc.student_hidden_size, teacher.hidden_size
    if not 0 < d_s <= d_t:
        found.append(f"model.lrc.student_hidden_size={d_s} must be in 1..{d_t}, the teacher's hidden_size")
        return found
    args = ModelArgs.from_hf(teacher)
    try:
        resized_config(teacher, d_s, args.head_dim, args.rms_norm_eps, args.tie_word_embeddings)
    except INVALID_CONFIG as e:
        found.append(f"model.lrc.student_hidden_size: {e}")
    return found


def _data(cfg: TrainConfig) -> list[str]:
    d, m, found = cfg.data, cfg.model, []
    if not d.paths:
        return ["data.paths is empty: pass token-set directories written by data_prep/tokenize.py"]
    if d.mixture_weights() is not None:  # a single path needs none (a recipe's are ignored)
        if len(d.weights) != len(d.paths):
            found.append(f"data.weights has {len(d.weights)} weights for {len(d.paths)} data.paths; give one per path, "
                         f"or --data.weights=null to weigh them equally")
        elif any(w <= 0 for w in d.weights):
            found.append(f"data.weights={d.weights}: every weight must be positive")
    # the vocabulary and tokenizer of the model that reads the tokens
    model_dir = m.student if m.method == "lm" or (m.method == "kd" and m.student) else m.teacher
    vocab = None
    if m.method == "lrc" and m.cross_tokenizer():  # the student's own vocabulary (lrc_dist.vocab)
        vocab = load_tokenizer(Path(m.student)).get_vocab_size(with_added_tokens=True)
    elif model_dir and (Path(model_dir) / "config.json").is_file():
        try:
            vocab = load_config(model_dir).vocab_size
        except CheckpointError:
            pass  # named by _models
    for i, path in enumerate(d.paths):
        file = Path(path) / "manifest.json"
        if not file.is_file():
            found.append(f"data.paths[{i}]={path} has no manifest.json: tokenize the corpus there with "
                         f"data_prep/tokenize.py (after a split run: data_prep/tokenize.py merge {path})")
            continue
        try:
            manifest = Manifest.read(file)
        except ValueError as e:
            found.append(f"data.paths[{i}]: {e}")
            continue
        if vocab is not None:
            found += [f"data.paths[{i}]: {p}" for p in misfit(Path(path), manifest, vocab, m.tokenizer_dir()) if p]
    return found

"""Training configuration: one dataclass tree, read from YAML (or a Python recipe), with dotted
command-line overrides such as `--optim.lr=3e-4 --parallel.backend=deepspeed`."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lrc_dist.indexed_dataset import tokenizer_sha256
from lrc_dist.losses import LossConfig
from lrc_dist.lrc import LRCConfig


METHODS = ("lrc", "kd", "lm")


@dataclass
class ModelConfig:
    # lrc: Low-Rank Clone. kd: logit KD into an ordinary student (the baseline). lm: the student
    # alone on the LM loss (pre-training; the demo makes its teacher this way).
    method: str = "lrc"
    teacher: str = ""  # local Hugging Face checkpoint directory of the frozen teacher
    # kd/lm: a checkpoint dir with the student's config.json (+ tokenizer; its weights, if any, are
    # the start). kd without it: a random student of the LRC student's shape (lrc.student_hidden_size).
    # kd with a tokenizer.json other than the teacher's: distillation across tokenizers (align.py).
    student: str = ""
    dtype: str = "bfloat16"  # teacher weights and compute; trainable tensors stay fp32 masters
    lrc: LRCConfig = field(default_factory=lambda: LRCConfig(student_hidden_size=0))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"model.method={self.method!r}; choose from {', '.join(METHODS)}.")

    def tokenizer_dir(self) -> str:
        """Where the tokenizer of the trained model's input lives: the student's dir if it has one."""
        if self.student and (Path(self.student) / "tokenizer.json").is_file():
            return self.student
        return self.teacher or self.student

    def cross_tokenizer(self) -> bool:
        """kd whose student has a tokenizer.json other than the teacher's (compared by sha256):
        the data is in the student's tokens, the teacher reads them re-tokenized, and the KD
        terms compare aligned positions on the shared vocabulary (lrc_dist.align)."""
        if self.method != "kd" or not self.student or not self.teacher:
            return False
        student, teacher = Path(self.student) / "tokenizer.json", Path(self.teacher) / "tokenizer.json"
        return student.is_file() and teacher.is_file() and tokenizer_sha256(student) != tokenizer_sha256(teacher)


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # token-set directories written by data_prep/tokenize.py
    weights: list[float] | None = None  # mixture weights, one per path; None: equal
    seq_len: int = 2048
    seed: int = 1234
    verify: str = "fast"  # checksum check at open: fast | full | none
    # cross-tokenizer KD: the most teacher tokens a window's text may take (the rest go unaligned);
    # None: 2 * seq_len
    teacher_max_len: int | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "linear"  # warmup then linear decay (paper) | cosine
    warmup: float = 0.005  # a fraction of the steps if < 1, else a step count
    min_lr_ratio: float = 0.0  # the schedule ends at min_lr_ratio * lr


@dataclass
class ParallelConfig:
    backend: str = "fsdp"  # fsdp | deepspeed | none (one process, no sharding)
    teacher: str = "auto"  # fsdp: shard | replicate | auto (replicate when it fits in a quarter of memory)
    activation_checkpointing: bool = True  # recompute the student in backward, never the teacher
    # LRC on several ranks: each rank generates 1/world of every W_T @ P and the ranks all-gather
    # the result (its gradient reduce-scatters in the compute dtype). Pays when the all-gathers cost
    # less than the matmuls saved (fast interconnect, few tokens per forward); with gloo on one CPU
    # machine it was 2-4% slower (bench/RESULTS.md).
    shard_generation: bool = False
    deepspeed_config: str = "ds_configs/zero3.json"
    param_dtype: str = "bfloat16"  # fsdp: compute dtype of the gathered parameters
    reduce_dtype: str = "float32"  # fsdp: gradient reduction dtype


@dataclass
class CheckpointConfig:
    dir: str = "runs/lrc"
    interval: int = 500  # steps between checkpoints (and one at the end)
    interval_minutes: float | None = None  # also checkpoint when this much time passed since the last one
    keep: int = 2  # newest checkpoints kept
    export_interval: int = 0  # steps between HF exports of the student; 0: at the end only
    resume: bool = True  # continue from dir/latest when it exists
    # config keys (or sections, e.g. model.lrc) that may differ from the checkpoint's at this resume,
    # beyond those that may always change (RESUME_MAY_CHANGE), e.g. [model.teacher] after a move
    allow_changes: list[str] = field(default_factory=list)
    lock_stale_minutes: float = 10.0  # a run-dir lock of another host not refreshed for this long is stale


@dataclass
class LogConfig:
    interval: int = 10
    wandb_project: str | None = None  # None: no wandb
    wandb_mode: str = "offline"  # online | offline | disabled
    run_name: str | None = None
    peak_tflops: float | None = None  # per device, for MFU; None: looked up for known GPUs


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: int = 1000  # the schedule's length
    stop_at: int | None = None  # end this run (with a checkpoint) after this step, e.g. before a time limit
    micro_batch_size: int = 1  # sequences per device per forward
    global_batch_size: int = 16  # sequences per optimizer step (tokens/step = this * seq_len)
    seed: int = 0
    max_bad_steps: int = 5  # consecutive bad steps (non-finite or spiking loss) before the run aborts
    # skip a step whose loss exceeds this many times the mean loss of the last SPIKE_WINDOW good
    # steps (counted as a bad step); None: off
    loss_spike_factor: float | None = None
    device: str = "auto"  # auto | cpu | cuda


def build(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from nested dicts; unknown keys are errors that list the options."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(where + k for k in unknown)}; "
                         f"{where or 'top level'} accepts {sorted(names)}.")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        origin = typing.get_origin(kind)
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, value or {}, f"{where}{name}.")
            continue
        if isinstance(value, str) and (origin in (list, tuple) or list in typing.get_args(kind)):
            # The command line gives `--data.paths=[a,b]` or `--data.paths=a,b` as a plain string.
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        kwargs[name] = tuple(value) if origin is tuple and isinstance(value, list) else value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def load_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file or a Python recipe (a module defining `config`), plus overrides."""
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config {path} does not exist; pass a YAML file or a .py recipe (see configs/).")
        if file.suffix == ".py":
            spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            tree = to_dict(module.config)
        else:
            tree = yaml.safe_load(file.read_text()) or {}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return build(TrainConfig, tree)


# Keys a resume may change freely: the run's length, logging, checkpointing, and how the same
# computation is laid out on the devices (the curve is the same to rounding).
RESUME_MAY_CHANGE = ("steps", "stop_at", "max_bad_steps", "loss_spike_factor", "device", "micro_batch_size",
                     "log", "checkpoint", "data.verify", "parallel.activation_checkpointing", "parallel.teacher",
                     "parallel.shard_generation", "parallel.param_dtype", "parallel.reduce_dtype")
DCP_BACKENDS = ("fsdp", "none")  # one checkpoint format: either resumes the other


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples compare alike."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def resume_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """The keys whose value differs from the checkpoint's config and may not change at a resume,
    as "key: saved -> now" lines."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    allowed = (*RESUME_MAY_CHANGE, *cfg.checkpoint.allow_changes)
    changes = []
    for key in sorted(old):  # a key the checkpoint's config lacks is an option added since
        a, b = old[key], new.get(key)
        if a == b or any(key == k or key.startswith(k + ".") for k in (k.rstrip(".") for k in allowed)):
            continue
        if key == "parallel.backend" and a in DCP_BACKENDS and b in DCP_BACKENDS:
            continue
        changes.append(f"{key}: {a!r} -> {b!r}")
    return changes

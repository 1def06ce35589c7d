"""Training configuration: one dataclass tree, read from a YAML file (or a Python recipe) and typed
command-line overrides such as `--optim.lr=3e-4 --data.paths=[a,b] --log.wandb_project=null`.

The tree is the one definition. `python -m lrc_dist.train --help` lists every key with its type,
default and doc, generated from it (jsonargparse reads the attribute docstrings), and a value from
a file or the command line is checked against its type (ints, floats, bools, lists, optionals,
`Literal` choices) with an error naming the key. Checks that need more than a type (ranges,
paths, the teacher's shape) are `lrc_dist.preflight`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lrc_dist.indexed_dataset import tokenizer_sha256
from lrc_dist.losses import LossConfig
from lrc_dist.lrc_config import LRCConfig
from lrc_dist.resources import shipped


class ConfigError(ValueError):
    """Problems with what the user asked for, each naming its key: printed once, exit code 2."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = "a problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        super().__init__(f"{head} with the configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class ModelConfig:
    """The teacher, the student and how the student is trained."""

    method: Literal["lrc", "kd", "lm"] = "lrc"
    """lrc: Low-Rank Clone; kd: logit KD into an ordinary student (the baseline); lm: the student
    alone on the LM loss (pre-training; the demo makes its teacher this way)"""
    teacher: str = ""
    """local Hugging Face checkpoint directory of the frozen teacher"""
    student: str = ""
    """kd/lm: a checkpoint dir with the student's config.json (and tokenizer; its weights, if any,
    are the start); kd without it: a random student of the LRC student's shape; kd with a
    tokenizer.json other than the teacher's: distillation across tokenizers. lrc: a dir with the
    student's own tokenizer (tokenizer.json and its files; anything else there is not read), for
    LRC across tokenizers (lrc_dist/vocab.py); unset: the student inherits the teacher's"""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """teacher weights and compute; trainable tensors stay fp32 masters"""
    lrc: LRCConfig = field(default_factory=lambda: LRCConfig(student_hidden_size=0))

    def tokenizer_dir(self) -> str:
        """Where the tokenizer of the trained model's input lives: the student's dir if it has one."""
        if self.student and (Path(self.student) / "tokenizer.json").is_file():
            return self.student
        return self.teacher or self.student

    def cross_tokenizer(self) -> bool:
        """kd or lrc whose student has a tokenizer.json other than the teacher's (compared by
        sha256): the data is in the student's tokens, the teacher reads them re-tokenized, and the
        KD terms (and LRC's clone terms) compare aligned positions (lrc_dist.align)."""
        if self.method not in ("kd", "lrc") or not self.student or not self.teacher:
            return False
        student, teacher = Path(self.student) / "tokenizer.json", Path(self.teacher) / "tokenizer.json"
        return student.is_file() and teacher.is_file() and tokenizer_sha256(student) != tokenizer_sha256(teacher)


@dataclass
class DataConfig:
    """The token sets and how they are mixed and packed."""

    paths: list[str] = field(default_factory=list)
    """token-set directories written by data_prep/tokenize.py"""
    weights: list[float] | None = None
    """mixture weights, one per path; null: equal (a single path needs none)"""
    seq_len: int = 2048
    """tokens per training window"""
    seed: int = 1234
    """seed of the mixture's sample order"""
    verify: Literal["fast", "full", "none"] = "fast"
    """checksum check of the token sets at open"""
    teacher_max_len: int | None = None
    """across tokenizers (KD and LRC): the most teacher tokens a window's text may take (the rest
    go unaligned); null: 2 * seq_len"""
    document_mask: bool = False
    """attention stays within each document of a packed window (no token attends across an EOS)
    and RoPE positions restart per document, for teacher and student alike"""

    def mixture_weights(self) -> list[float] | None:
        """The weights the mixture uses: none (equal) for a single path, whatever a recipe says."""
        return self.weights if self.weights is not None and len(self.paths) > 1 else None


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """peak learning rate"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas"""
    eps: float = 1e-8
    """AdamW's eps"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0: no clipping"""
    schedule: Literal["linear", "cosine"] = "linear"
    """after warmup: linear decay (paper) or cosine, to min_lr_ratio * lr at the last step"""
    warmup: float = 0.005
    """warmup length: a fraction of the steps if < 1, else a step count"""
    min_lr_ratio: float = 0.0
    """the schedule ends at min_lr_ratio * lr"""
    dskd_projector_lr_scale: float | None = None
    """DSKD's t2s projector learns at this multiple of lr; null: rms(t2s) / rms(the student's
    weights) at init, so that it keeps pace with the head it decodes through (lrc_dist.dskd)"""


@dataclass
class ParallelConfig:
    """How the job is laid out on the devices."""

    backend: Literal["fsdp", "deepspeed", "none"] = "fsdp"
    """fsdp (FSDP2), deepspeed (ZeRO) or none (one process, no sharding)"""
    teacher: Literal["auto", "shard", "replicate"] = "auto"
    """fsdp: shard the teacher with its blocks, replicate it, or auto (replicate when it fits in a
    quarter of device memory)"""
    activation_checkpointing: bool = True
    """recompute the student in backward, never the teacher"""
    shard_generation: bool = False
    """LRC on several ranks: each rank generates 1/world of every W_T @ P and the ranks all-gather
    the result; pays when the all-gathers cost less than the matmuls saved (bench/RESULTS.md)"""
    compile: bool = False
    """torch.compile each block (LRC) or layer (KD) once activation checkpointing is set, before
    FSDP2 shards it (torchtitan's order); the first step compiles (tens of seconds per block shape)"""
    deepspeed_config: str = "ds_configs/zero3.json"
    """deepspeed: the ZeRO JSON config (ds_configs/: zero3, zero2, zero3_offload)"""
    param_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """fsdp: compute dtype of the gathered parameters"""
    reduce_dtype: Literal["bfloat16", "float16", "float32"] = "float32"
    """fsdp: gradient reduction dtype"""


@dataclass
class CheckpointConfig:
    """Checkpoints, exports and resuming."""

    dir: str = "runs/lrc"
    """the run directory: checkpoints, exports, metrics.jsonl, the lock"""
    interval: int = 500
    """steps between checkpoints (and one at the end)"""
    interval_minutes: float | None = None
    """also checkpoint when this much time passed since the last one; null: off"""
    keep: int = 2
    """newest checkpoints kept"""
    export_interval: int = 0
    """steps between HF exports of the student; 0: at the end only"""
    resume: bool = True
    """continue from dir/latest when it exists"""
    allow_changes: list[str] = field(default_factory=list)
    """config keys (or sections, e.g. model.lrc) that may differ from the checkpoint's at this
    resume, beyond those that always may (RESUME_MAY_CHANGE), e.g. [model.teacher] after a move"""
    lock_stale_minutes: float = 10.0
    """a run-dir lock of another host not refreshed for this long is stale"""


@dataclass
class LogConfig:
    """Console, metrics.jsonl and wandb."""

    interval: int = 10
    """steps between log lines; each shows the interval's means"""
    wandb_project: str | None = None
    """wandb project; null: no wandb"""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """offline needs no network (upload later with wandb sync)"""
    run_name: str | None = None
    """the wandb run's name"""
    peak_tflops: float | None = None
    """peak dense TFLOP/s per device, for MFU; null: looked up for known GPUs"""


@dataclass
class TrainConfig:
    """An lrc_dist training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: int = 1000
    """optimizer steps of the run (the schedule's length)"""
    stop_at: int | None = None
    """end this run (with a checkpoint) after this step, e.g. before a time limit; null: at steps"""
    micro_batch_size: int = 1
    """sequences per device per forward"""
    global_batch_size: int = 16
    """sequences per optimizer step (tokens per step = this * data.seq_len)"""
    seed: int = 0
    """seed of the initialisation"""
    max_bad_steps: int = 5
    """consecutive bad steps (non-finite or spiking loss) before the run aborts"""
    loss_spike_factor: float | None = None
    """skip a step whose loss exceeds this many times the mean loss of the last 50 good steps (a bad
    step); null: off"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available"""


# ---- reading a config --------------------------------------------------------------------------


@functools.cache
def arg_parser():
    """The command line of `python -m lrc_dist.train`, generated from the TrainConfig tree."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="python -m lrc_dist.train", exit_on_error=False, default_env=False,
        usage="python -m lrc_dist.train [CONFIG] [--KEY=VALUE ...]   (under torchrun: torchrun ... -m lrc_dist.train ...)",
        description="Train an LRC student (or a KD / LM baseline). CONFIG is a YAML file or a .py recipe "
                    "defining `config` (see configs/); every key below overrides it, e.g. --optim.lr=3e-4, "
                    "--data.paths=[a,b], --log.wandb_project=null. Exit codes: 0 done, 2 bad configuration, "
                    "65 diverged, 69 run dir in use, 75 preempted (run again to resume).")
    parser.add_argument("config", nargs="?", type=str, help="a YAML file or .py recipe; its values are the defaults")
    parser.add_class_arguments(TrainConfig, nested_key=None, fail_untyped=True, sub_configs=False)
    return parser


def read_tree(path: str | Path) -> dict:
    """The nested dict of a YAML config or of a Python recipe (a module defining `config`); a
    shipped recipe such as configs/lrc_qwen7b.yaml is found from any directory."""
    file = shipped(path)
    if not file.is_file():
        raise ConfigError(f"config {path} does not exist; pass a YAML file or a .py recipe (see configs/).")
    if file.suffix == ".py":
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return to_dict(module.config)
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(tree).__name__}.")
    return _drop_empty_sections(tree, TrainConfig)


def _drop_empty_sections(tree: dict, cls) -> dict:
    """A section whose keys are all commented out reads as null in YAML: it means the defaults."""
    sections = {f.name: f.type for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in tree.items():
        kind = hints.get(key) if key in sections else None
        if kind is not None and dataclasses.is_dataclass(kind):
            if value is None:
                continue
            if isinstance(value, dict):
                value = _drop_empty_sections(value, kind)
        out[key] = value
    return out


def keys() -> list[str]:
    """Every dotted key of the tree."""
    return sorted(flatten(to_dict(TrainConfig())))


def _explain(error: Exception, source: str) -> ConfigError:
    """jsonargparse's message, worded for a user: the key, and for an unknown one the nearest."""
    text = str(error).strip()
    unknown = re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", text)
    if unknown:
        wrong = [f"{unknown[1]}.{unknown[2]}"]
    elif m := re.search(r"unrecognized arguments: (.*)", text):
        wrong = [a.split("=", 1)[0].lstrip("-") for a in m[1].split() if a.startswith("--")]
    elif m := re.search(r"Key '([\w.]+)' is not expected", text):
        wrong = [m[1]]
    else:
        m = re.search(r'Parser key "([\w.]+)":\s*Expected a (.*?)\. Got value: (.*)', text, re.S)
        union = re.search(r'Parser key "([\w.]+)":.*Subtypes: \[(.*?)\]\n.*Given value: (.*)', text, re.S)
        if union:
            types = re.sub(r"<class '(\w+)'>", r"\1", union[2]).replace("NoneType", "null").split(", ")
            return ConfigError(f"{union[1]}: expected {' or '.join(types)}, got {union[3].strip()} ({source})")
        if not m:
            return ConfigError(f"{text} ({source})")
        expected = re.sub(r"<class '(\w+)'>", r"\1", m[2])
        if choices := re.fullmatch(r"typing\.Literal\[(.*)\]", expected):
            expected = "one of " + choices[1].replace("'", "")
        return ConfigError(f"{m[1]}: expected {expected}, got {m[3].strip()!r} ({source})")
    known = keys()
    problems = []
    for key in wrong:
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(near)}?" if near else "; `--help` lists every key"
        problems.append(f"unknown config key {key} ({source}){hint}")
    return ConfigError(problems)


def set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def config_of(tree: dict, source: str = "the config") -> TrainConfig:
    """A TrainConfig from a nested dict, its values checked against the tree's types."""
    from jsonargparse import ArgumentError

    parser = arg_parser()
    try:
        return _instantiate(parser.parse_object(tree))
    except (ArgumentError, TypeError, ValueError) as e:
        raise _explain(e, source) from None


def _instantiate(namespace) -> TrainConfig:
    values = arg_parser().instantiate(namespace)
    return TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)})


def load_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file or a Python recipe, plus dotted overrides (Python values)."""
    tree = read_tree(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    source = f"{path} and its overrides" if path and overrides else str(path) if path else "the overrides"
    return config_of(tree, source)


def parse_args(argv: list[str]) -> TrainConfig:
    """The command line: `[CONFIG] [--dotted.key=value ...]`; `--help` prints every key and exits."""
    from jsonargparse import ArgumentError

    parser = arg_parser()
    path = argv[0] if argv and not argv[0].startswith("-") else None
    tree = read_tree(path) if path else None  # its own ConfigError: the file is missing or no mapping
    try:
        base = parser.parse_object(tree) if path else None
    except (ArgumentError, TypeError, ValueError) as e:
        raise _explain(e, path) from None
    try:
        namespace = parser.parse_args(argv[1:] if path else argv, namespace=base)
    except (ArgumentError, TypeError, ValueError) as e:
        raise _explain(e, "the command line") from None
    if path is None and namespace.config:
        raise ConfigError(f"CONFIG ({namespace.config}) must come first, before the --key=value overrides")
    return _instantiate(namespace)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---- resuming ----------------------------------------------------------------------------------

# Keys a resume may change freely: the run's length, logging, checkpointing, and how the same
# computation is laid out on the devices (the curve is the same to rounding).
RESUME_MAY_CHANGE = ("steps", "stop_at", "max_bad_steps", "loss_spike_factor", "device", "micro_batch_size",
                     "log", "checkpoint", "data.verify", "parallel.activation_checkpointing", "parallel.teacher",
                     "parallel.shard_generation", "parallel.param_dtype", "parallel.reduce_dtype", "parallel.compile")
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

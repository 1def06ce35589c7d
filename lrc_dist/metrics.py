"""Training metrics: FLOPs and MFU of an LRC step, and a rank-0 logger (console, JSONL, wandb)."""

from __future__ import annotations

import json
import os
import resource
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from lrc_dist.checkpoint import write_atomic
from lrc_dist.families import ModelArgs

# Dense bf16 tensor-core peak per device, by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12,
                   "A800": 312e12, "L40S": 362e12, "B200": 2250e12, "GB200": 2500e12}


def lrc_flops_per_token(args: ModelArgs, d_s: int, seq_len: int, tokens_per_forward: int,
                        generation_ranks: int = 1, dense: tuple[str, list[str]] | None = None,
                        student_vocab: int | None = None, project_head: bool = False) -> float:
    """Model FLOPs of one trained token on one device (activation recompute not counted, as MFU
    conventionally).

    = teacher forward + student forward and backward at width d_S + the projection work: generating
    every student weight W_T @ P once per forward (and its gradient for P), split over
    `generation_ranks` devices (`LowRankClone.set_generation_matmul`), and mapping embeddings and the
    attention/FFN clone targets through P. The head's share is `head_flops_per_token`'s
    (`project_head`: the logits read through the teacher's head, lrc.head_logits).

    In the dense phase, `dense` = (lrc.dense_projections, the kept projections: o and/or down):
    no generation; the kept projections map their clone targets (forward, and dP when they train).
    `student_vocab`: the student's vocabulary across tokenizers (default: the teacher's); the
    teacher is counted at one token per student token, which its re-tokenized text roughly is.
    """
    q, kv, inter, d_t, vocab, layers = (args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim,
                                        args.intermediate_size, args.hidden_size, args.vocab_size, args.num_layers)
    vocab = args.vocab_size if student_vocab is None else student_vocab
    teacher = forward_flops_per_token(args, seq_len)
    student = 3 * forward_flops_per_token(replace(args, hidden_size=d_s, vocab_size=vocab), seq_len)
    if dense is not None:
        projections, kept = dense
        per_target = (4 if projections == "train" else 2) * d_t * d_s
        return teacher + student + per_target * len(kept) * layers
    body = student - 6 * vocab * d_s  # the student without its head: the head is head_flops_per_token's
    head = head_flops_per_token(vocab, d_t, d_s, tokens_per_forward * generation_ranks, project_head)
    per_token_projection = 4 * d_t * d_s * (1 + 2 * layers)  # embedding, o and down clone targets: fwd + dP
    weight_generation = 4 * d_t * d_s * layers * (2 * q + 2 * kv + 3 * inter)  # per forward
    return teacher + body + head + per_token_projection + weight_generation / (tokens_per_forward * generation_ranks)


def projects_head(head_logits: str, vocab: int, d_t: int, d_s: int, tokens_per_generation: int) -> bool:
    """lrc.head_logits's choice for a student that may project: project, or under auto whenever that
    costs fewer FLOPs than generating the head once per `tokens_per_generation` tokens."""
    if head_logits != "auto":
        return head_logits == "project"
    shape = vocab, d_t, d_s, tokens_per_generation
    return head_flops_per_token(*shape, True) < head_flops_per_token(*shape, False)


def head_flops_per_token(vocab: int, d_t: int, d_s: int, tokens_per_generation: int, project: bool) -> float:
    """The student head's training FLOPs per token, forward and backward. Generated (W_S = W_T P):
    the logits' forward, their gradients for h_S and W_S (6 V d_S), and W_T P with its gradient for
    P once per `tokens_per_generation` tokens (4 V d_T d_S). Projected ((h_S P^T) W_T^T): h_S P^T
    with its two gradients (6 d_T d_S) and the logits' forward and gradient for the input at width
    d_T (4 V d_T); the teacher's head takes no gradient."""
    if project:
        return 4 * vocab * d_t + 6 * d_t * d_s
    return 6 * vocab * d_s + 4 * vocab * d_t * d_s / tokens_per_generation


def forward_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Matmul FLOPs of one token through a decoder and its head (attention without causal discount)."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    d = args.hidden_size
    layer = d * (q + 2 * kv) + q * d + 3 * d * args.intermediate_size
    attention = 4 * seq_len * q  # scores and weighted values
    return 2 * (args.num_layers * layer + args.vocab_size * d) + args.num_layers * attention


def kd_flops_per_token(student: ModelArgs, teacher: ModelArgs | None, seq_len: int) -> float:
    """Student forward and backward, plus the teacher's forward when there is one."""
    return 3 * forward_flops_per_token(student, seq_len) + (forward_flops_per_token(teacher, seq_len) if teacher else 0)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


class MetricsLogger:
    """Writes on rank 0 only: a console line, `metrics.jsonl` under the run dir, and wandb if set.

    A run resumed at step N continues both: `metrics.jsonl` first drops the records after step N
    (those of steps lost in a crash, which the resumed run logs again), and wandb continues the
    run whose id is kept in RUN_DIR/wandb_run_id."""

    def __init__(self, run_dir: str | Path, is_main: bool, wandb_project: str | None, wandb_mode: str,
                 run_name: str | None, config: dict, resume_step: int = 0):
        self.is_main, self.wandb = is_main, None
        if not is_main:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        lines = [line for line in (path.read_text().splitlines() if path.is_file() else []) if line.strip()]
        kept = [line for line in lines if _step_of(line) <= resume_step]
        if len(kept) < len(lines):
            print(f"{path}: dropped {len(lines) - len(kept)} record(s) after step {resume_step}, where this run "
                  f"{'resumes' if resume_step else 'starts'}", flush=True)
        write_atomic(path, "".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a")
        if wandb_project and wandb_mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_run_id"
            if resume_step and id_file.is_file():
                run_id = id_file.read_text().strip()
            else:
                run_id = uuid.uuid4().hex[:8]  # wandb's own id form: 8 of [a-z0-9]
                write_atomic(id_file, run_id)
            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self.wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, config=config,
                                    dir=str(run_dir), id=run_id, resume="allow")

    def log(self, step: int, metrics: dict[str, float], total_steps: int | None = None) -> None:
        if not self.is_main:
            return
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        print(console_line(step, total_steps, metrics), flush=True)

    def close(self) -> None:
        if self.is_main:
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a line torn by a crash: dropped


# ---- a log interval's numbers -------------------------------------------------------------------


def new_interval(previous: dict | None = None) -> dict:
    """The sums of one log interval (JSON, so that a checkpoint carries them across a resume)."""
    return {"sums": {}, "good": 0, "skipped": 0, "keys": previous["keys"] if previous else []}


def add_to_interval(interval: dict, metrics: dict[str, float]) -> None:
    """A good step's metrics."""
    interval["good"] += 1
    for key, value in metrics.items():
        interval["sums"][key] = interval["sums"].get(key, 0.0) + value
    interval["keys"] = sorted(set(interval["keys"]) | set(metrics))


def interval_means(interval: dict) -> dict[str, float]:
    """The mean of every metric over the interval's good steps (NaN when all were skipped), and
    the count of skipped steps."""
    n = interval["good"]
    means = {k: interval["sums"].get(k, 0.0) / n if n else float("nan") for k in interval["keys"]}
    return {**means, "skipped_steps": interval["skipped"]}


def human(n: float) -> str:
    """12,345 -> "12.3K", 1.45e9 -> "1.45B"."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}:{minutes:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}"


def console_line(step: int, total: int | None, m: dict) -> str:
    """One log record as a person reads it: interval means of the loss terms, then progress."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    parts += [f"{k} {m[k]:.4g}" for k in ("loss", "lm", "kl", "clone", "dskd", "grad_norm") if m.get(k) is not None]
    if m.get("lr") is not None:
        parts.append(f"lr {m['lr']:.3g}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    if m.get("tokens_seen") is not None:
        parts.append(f"{human(m['tokens_seen'])} tokens")
    if m.get("step_time_s") is not None:
        parts.append(f"{m['step_time_s']:.3g} s/step, ETA {_duration(m['eta_s'])}")
    if m.get("tokens_per_s_per_device") is not None:
        parts.append(f"{m['tokens_per_s_per_device']:,.0f} tok/s/device")
    if m.get("mfu") is not None:
        parts.append(f"MFU {m['mfu']:.1%}")
    if m.get("memory_gb") is not None:
        parts.append(f"{m['memory_gb']:.2f} GB")
    return " | ".join(parts)


class AgreementWatch:
    """Warns, once a run, when DSKD's dskd/agree falls to under half of the highest value logged
    (at least 0.5): the masked student-space term then trains on few tokens."""

    def __init__(self):
        self.best, self.warned = 0.0, False

    def update(self, agree: float | None) -> str | None:
        if agree is None or agree != agree or self.warned:
            return None
        if self.best >= 0.5 and agree < 0.5 * self.best:
            self.warned = True
            return (f"WARNING: dskd/agree fell from {self.best:.2f} to {agree:.2f}: on most tokens the projected teacher "
                    f"no longer predicts the teacher's token, so the masked student-space DSKD term trains on few of "
                    f"them; raise optim.dskd_projector_lr_scale or set loss.dskd_mask=false.")
        self.best = max(self.best, agree)
        return None

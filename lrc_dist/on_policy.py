"""On-policy distillation (`loss.on_policy_ratio`): part of the training windows is continued by
the current student, and the teacher grades the student's own tokens (GKD, DSKD's on-policy mode).

A window of the data stream is on-policy when its sample index says so (`on_policy_samples`):
exactly `ratio` of the stream, the same windows at any world size and after any resume. Their
tokens are the same too where the arithmetic does not depend on which rows share a batch (fp32
on CPU: tested); in bf16 on a GPU a near tie may draw otherwise at another world size. Such a
window keeps its first P = seq_len + 1 - N tokens as the prompt, and the student samples the other
N (`loss.on_policy_new_tokens`) with the KV-cache sampler (lrc_dist.sampling), drawing from a
generator seeded by the run's seed and the sample index. The model's forward then runs on the
whole window: the KD, DSKD and clone terms on every position, the generated ones included, the LM
term only where the next token is data (its labels are ignored from the prompt's last token on).
Every term stays a mean over the step's labelled tokens, so the LM term counts the data tokens
over all tokens.

The sampling student is materialised once per optimizer step as an ordinary `CausalLM` on every
rank (`materialised_student`: the export's parts, gathered one at a time from a sharded model, in
the compute dtype on the device), so that generation needs no collective per token; it costs the
student's weights once more in device memory while the step's micro-batches are continued.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lrc_dist.export import Gather, part_tensors
from lrc_dist.families import ModelArgs
from lrc_dist.interface import DistillationModel
from lrc_dist.losses import IGNORE_INDEX, LossConfig
from lrc_dist.model import CausalLM
from lrc_dist.sampling import Decoder, SamplingConfig, generate

SEED_STRIDE = 1_000_003  # the generator of sample i in a run of seed s: s * SEED_STRIDE + i


def on_policy_samples(sample_ids: Tensor, ratio: float) -> Tensor:
    """Which samples of the stream are on-policy: sample i is when floor((i + 1) r) > floor(i r),
    which picks exactly floor(n r) of the first n samples, evenly spread."""
    ids = sample_ids.double()
    return torch.floor((ids + 1) * ratio) > torch.floor(ids * ratio)


def on_policy_seeds(sample_ids: Tensor, ratio: float, seed: int) -> Tensor:
    """Per sample: the seed of its generator when it is on-policy, else -1 (the batches carry these
    as `on_policy_seeds`, for `on_policy_batch`)."""
    seeds = seed * SEED_STRIDE + sample_ids
    return torch.where(on_policy_samples(sample_ids, ratio), seeds, torch.full_like(seeds, -1))


@torch.no_grad()
def materialised_student(model: DistillationModel, gathered: Gather, dtype: torch.dtype) -> CausalLM:
    """The student of `model` as an ordinary CausalLM, on the parameters' device in `dtype`, on
    every rank: its Hugging Face tensors (`student_parts`), each part gathered (collective) and
    computed in fp32 as the export does."""
    state = part_tensors(model, model.student_parts(), gathered, lambda v: v.to(dtype, copy=True).contiguous())
    config = model.student_hf_config()
    with torch.device("meta"):
        student = CausalLM(ModelArgs.from_hf(config), config)
    student.load_state_dict(state, assign=True, strict=True)
    return student


def sampling_config(cfg: LossConfig) -> SamplingConfig:
    return SamplingConfig(cfg.on_policy_new_tokens, cfg.on_policy_temperature, cfg.on_policy_top_p)


def on_policy_batch(input_ids: Tensor, labels: Tensor, seeds: Tensor, decoder: Decoder,
                    cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
    """(input_ids, labels, LM labels, metrics) of the micro-batch with its on-policy windows (seeds
    >= 0) continued by the student, `decoder`. The LM labels
    are None when no window is on-policy: they are the labels then. The metrics are there either
    way (every rank's micro-batches must log the same keys)."""
    rows = (seeds >= 0).nonzero().flatten()
    if not len(rows):
        return input_ids, labels, None, {"on_policy/generated_tokens": torch.tensor(0.0),
                                         "on_policy/generation_s": torch.tensor(0.0)}
    if (labels[rows] == IGNORE_INDEX).any():
        raise ValueError("on-policy windows must be packed token windows (no ignored labels) to take a prompt from")
    L, new = input_ids.shape[1], cfg.on_policy_new_tokens
    prompt = L + 1 - new
    windows = torch.cat([input_ids, labels[:, -1:]], dim=1)  # the L + 1 tokens of each window
    generators = [torch.Generator(device=input_ids.device).manual_seed(int(s)) for s in seeds[rows]]
    tick = time.perf_counter()
    continued = generate(decoder, windows[rows, :prompt], sampling_config(cfg), generators)
    seconds = time.perf_counter() - tick
    windows = windows.clone()
    windows[rows] = continued
    labels = windows[:, 1:]
    lm_labels = labels.clone()
    lm_labels[rows, prompt - 1:] = IGNORE_INDEX  # the next token is the student's own
    metrics = {"on_policy/generated_tokens": torch.tensor(float(len(rows) * new)),
               "on_policy/generation_s": torch.tensor(seconds)}
    return windows[:, :-1], labels, lm_labels, metrics

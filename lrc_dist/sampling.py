"""Sampling from the project's own decoder with a KV cache: the student's continuations that
on-policy distillation trains on (lrc_dist/on_policy.py).

    tokens = generate(model, prompts, SamplingConfig(max_new_tokens=64, temperature=1.0, top_p=0.95),
                      torch.Generator().manual_seed(seed))

The prompts [B, P] are read at once (prefill); each new token then costs one position through
every layer. Each layer keeps the keys and values of the tokens so far (after q/k-norm and RoPE,
in buffers sized for the whole sequence) and attends over them with the family's causal and
sliding-window masks, through the model's own `decoder_layer`. The logits equal those of a full
forward of the whole sequence, for every family (tests/test_sampling.py). A prompt is one
sequence: the document mask of packed training windows does not apply.

A token is drawn from softmax(logits / temperature), restricted to the nucleus (the most likely
tokens whose probabilities first reach `top_p`), with one draw per row from `generator`: a seed
gives the same tokens on every run. Temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lrc_dist.families import ModelArgs
from lrc_dist.model import Attention, CausalLM, Context, Rope, Rotary, Tap, Weights, attend, query_key_value

# A decoder layer as the sampler runs it: (hidden states, the chunk's Context, the attention) -> hidden states
Layer = Callable[[Tensor, Context, Attention], Tensor]


@dataclass
class Decoder:
    """What the sampler needs of a model: its args and RoPE, the embedding, the layers (called as
    modules where they are: FSDP2 and ZeRO-3 gather a layer's weights when it is called) and the
    head (final norm and LM head: hidden states -> logits)."""

    args: ModelArgs
    rotary: Rotary
    embed: Callable[[Tensor], Tensor]
    layers: list[Layer]
    head: Callable[[Tensor], Tensor]

    @classmethod
    def of(cls, model: CausalLM) -> "Decoder":
        layers = [lambda h, ctx, attn, layer=layer: layer(h, ctx, attn=attn) for layer in model.model.layers]
        return cls(model.args, model.rotary, model.embed, layers,
                   lambda h: F.linear(model.model.norm(h), model.lm_head_weight))


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    """tokens generated after each prompt"""
    temperature: float = 1.0
    """softmax temperature of the draw; 0: greedy (argmax)"""
    top_p: float = 1.0
    """nucleus sampling: draw among the most likely tokens whose probabilities first reach top_p"""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must not be negative (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


class CachedAttention:
    """One layer's attention over its KV cache, with `attention`'s signature (`decoder_layer`'s
    `attn`): the chunk's keys and values are written at `start`, and its queries attend over every
    key so far; `mask` is the chunk's keep-mask over them (`chunk_mask`)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __call__(self, x: Tensor, w: Weights, args: ModelArgs, rope: Rope, mask: Tensor | None, tap: Tap) -> Tensor:
        q, k, v = query_key_value(x, w, args, rope, tap)
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; this chunk would end at {end}")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return attend(q, self.k[:, :, :end], self.v[:, :, :end], args, mask)


def chunk_mask(start: int, length: int, window: int | None, device: torch.device) -> Tensor:
    """Keep-mask [length, start + length] of the queries at positions start.. over every key so far:
    causal, and within the sliding window when there is one."""
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    keep = k <= q
    return keep & (q - k < window) if window is not None else keep


def forward_chunk(model: CausalLM | Decoder, ids: Tensor, caches: list[CachedAttention], start: int) -> Tensor:
    """Logits [B, T, vocab] of the tokens `ids` [B, T] at positions start.., the earlier ones read
    from the caches (one per layer), which take these in."""
    d = model if isinstance(model, Decoder) else Decoder.of(model)
    a, T = d.args, ids.shape[1]
    h = d.embed(ids)
    windows = dict.fromkeys(a.window(i) for i in range(a.num_layers))
    ctx = Context(d.rotary.tables(torch.arange(start, start + T, device=ids.device), h.dtype),
                  {w: chunk_mask(start, T, w, ids.device) for w in windows})
    for layer, cache in zip(d.layers, caches):
        h = layer(h, ctx, cache)
    return d.head(h)


def sample_next(logits: Tensor, cfg: SamplingConfig,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """One token [B] per row of `logits` [B, vocab]: greedy at temperature 0, else a draw from the
    tempered nucleus; `generator` may be one per row (a row's draws then depend on its own seed
    only, whatever else shares the batch)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    # A diverged student (inf/NaN logits) draws uniformly instead of crashing the draw: its loss is
    # then non-finite too, and the trainer skips the step on every rank.
    probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, torch.ones_like(probs))
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= cfg.top_p, 0.0)  # the nucleus was complete
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLM | Decoder, prompts: Tensor, cfg: SamplingConfig,
             generator: torch.Generator | Sequence[torch.Generator] | None = None, eos_id: int | None = None) -> Tensor:
    """The prompts [B, P] and `cfg.max_new_tokens` sampled tokens after each: [B, P + new]. A row
    that has drawn `eos_id` is padded with it from there on."""
    B, P = prompts.shape
    model = model if isinstance(model, Decoder) else Decoder.of(model)
    caches = [CachedAttention(P + cfg.max_new_tokens) for _ in model.layers]
    logits = forward_chunk(model, prompts, caches, 0)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    new = []
    for t in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg, generator)
        if eos_id is not None:
            token = torch.where(done, eos_id, token)
            done |= token == eos_id
        new.append(token)
        if t + 1 == cfg.max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits = forward_chunk(model, token[:, None], caches, P + t)[:, -1]
    out = torch.stack(new, dim=1)
    if out.shape[1] < cfg.max_new_tokens:  # every row ended early
        out = F.pad(out, (0, cfg.max_new_tokens - out.shape[1]), value=eos_id)
    return torch.cat([prompts, out], dim=1)

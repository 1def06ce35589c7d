"""Model families as data: one `Family` entry per architecture the decoder (model.py) runs.

An entry says what sets a family apart: where each weight of a layer lives among the Hugging Face
names (`Family.names`, fused matrices included), its norms (which ones a layer has, and whether they
scale by w or by 1 + w), the embedding scale, the scale of the attention scores, the attention
pattern (one sliding window for every layer, or local and global layers with a RoPE of their own),
and the config values it cannot run. Loading, LRC's materialisation and the export all read
`Family.names`; the export's other constraints are transformers' own config validation
(`model.resized_config`). Adding a family = one entry in `FAMILIES` + its tiny config in
tests/conftest.py, which runs the parity, LRC and export tests on it.

Every family has the same top-level names: model.embed_tokens, model.layers.N, model.norm, lm_head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from transformers import PretrainedConfig

# Rope types whose frequencies are fixed at load time; "dynamic"/"longrope" change with the length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The norms of a layer at the model's width (the LRC student has its own); q_norm/k_norm are per head.
LAYER_NORMS = ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")


class CheckpointError(ValueError):
    """A model directory that cannot be used: the message names the file and the fix."""


def _names(**extra: str) -> dict[str, str]:
    """A layer's weights -> their HF names under model.layers.N: Llama's, plus or replaced by `extra`."""
    names = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
             "mlp_norm": "post_attention_layernorm.weight"}
    return {**names, **extra}


QKV_BIAS = dict(q_bias="self_attn.q_proj.bias", k_bias="self_attn.k_proj.bias", v_bias="self_attn.v_proj.bias")
QK_NORM = dict(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")


@dataclass(frozen=True)
class Family:
    """One architecture. `names` maps a layer's weights to their Hugging Face names; weights that
    share a name are stacked rows of one fused matrix, in `names`' order (Phi-3's qkv_proj)."""

    model_type: str
    names: dict[str, str]
    config_class: str
    """transformers' config class, whose validation is the export's constraint on d_S"""
    norm: Literal["llama", "gemma"] = "llama"
    """llama: weight * x_normed, rounded to the input dtype first; gemma: x_normed * (1 + weight) in fp32"""
    activation_key: str = "hidden_act"
    """the config attribute naming the MLP activation (gate: act(gate) * up)"""
    embed_scale: bool = False
    """embeddings are multiplied by sqrt(hidden_size) (Gemma)"""
    attn_scale_key: str | None = None
    """the config attribute s whose s^-0.5 scales attention scores (Gemma: query_pre_attn_scalar); default head_dim"""
    sliding: Literal["none", "all", "layer_types"] = "none"
    """none: full attention; all: config.sliding_window on every layer; layer_types: on the
    layers config.layer_types calls sliding_attention, each layer type with its own RoPE"""
    require: tuple[tuple[str, object], ...] = ()
    """(config attribute, the only value lrc_dist runs) pairs"""
    notes: str = ""

    @property
    def norm_init(self) -> float:
        """The norm weight that scales by 1."""
        return 0.0 if self.norm == "gemma" else 1.0


NO_SOFTCAP = (("attn_logit_softcapping", None), ("final_logit_softcapping", None))

FAMILIES = {f.model_type: f for f in (
    Family("llama", _names(), "LlamaConfig", notes="Llama-2, Llama-3.x"),
    Family("mistral", _names(), "MistralConfig", sliding="all"),
    Family("qwen2", _names(**QKV_BIAS), "Qwen2Config", require=(("use_sliding_window", False),),
           notes="Qwen2, Qwen2.5: q/k/v biases"),
    Family("qwen3", _names(**QK_NORM), "Qwen3Config", require=(("use_sliding_window", False),), notes="q/k-norm"),
    Family("gemma3_text", _names(**QK_NORM, attn_post_norm="post_attention_layernorm.weight",
                                 mlp_norm="pre_feedforward_layernorm.weight",
                                 mlp_post_norm="post_feedforward_layernorm.weight"),
           "Gemma3TextConfig", norm="gemma", activation_key="hidden_activation", embed_scale=True,
           attn_scale_key="query_pre_attn_scalar", sliding="layer_types",
           require=NO_SOFTCAP + (("use_bidirectional_attention", False),),
           notes="Gemma-3 text: four norms per layer, GeGLU, local/global layers"),
    Family("phi3", _names(q="self_attn.qkv_proj.weight", k="self_attn.qkv_proj.weight",
                          v="self_attn.qkv_proj.weight", gate="mlp.gate_up_proj.weight",
                          up="mlp.gate_up_proj.weight"),
           "Phi3Config", sliding="all", notes="Phi-3: fused qkv and gate_up (projections stay per matrix)"),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a decoder and its family's choices, read from an HF config (`ModelArgs.from_hf`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    activation: str = "silu"
    layer_types: tuple[str, ...] = ()
    """per layer: full_attention or sliding_attention"""
    sliding_window: int | None = None
    attn_scale: float | None = None
    """the scale of the attention scores; None: head_dim^-0.5"""
    family: Family = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.family is None:
            object.__setattr__(self, "family", FAMILIES[self.model_type])
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)

    @property
    def qkv_bias(self) -> bool:
        return "q_bias" in self.family.names

    @property
    def qk_norm(self) -> bool:
        return "q_norm" in self.family.names

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def scale_embeddings(self, h: Tensor) -> Tensor:
        """Embeddings times the family's scale at this width, sqrt(hidden_size) in h's dtype (rounded
        as transformers does), if it has one (Gemma)."""
        if not self.family.embed_scale:
            return h
        return h * torch.tensor(math.sqrt(self.hidden_size), device=h.device).to(h.dtype)

    @classmethod
    def from_hf(cls, config: PretrainedConfig, source: str = "config.json") -> "ModelArgs":
        kind = config.model_type
        family = FAMILIES.get(kind)
        if family is None:
            hint = " (a multimodal Gemma-3: distil its text model, `text_config` as a gemma3_text checkpoint)" if (
                kind == "gemma3") else ""
            raise CheckpointError(f"{source}: unsupported architecture model_type={kind!r}{hint}; lrc_dist supports "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
        for key, value in family.require:
            if getattr(config, key, value) != value:
                raise CheckpointError(f"{source}: {key}={getattr(config, key)!r} is not supported for {kind}; set it "
                                      f"to {value!r}.")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            # Qwen2's q/k/v bias is implicit in its model_type; an o_proj/MLP bias is not supported.
            raise CheckpointError(f"{source}: attention_bias/mlp_bias=true (o_proj/MLP biases) is not supported.")
        layer_types = ("full_attention",) * config.num_hidden_layers
        window = getattr(config, "sliding_window", None) if family.sliding != "none" else None
        if family.sliding == "layer_types":
            layer_types = tuple(config.layer_types)
        elif window is not None:
            layer_types = ("sliding_attention",) * config.num_hidden_layers
        for layer_type in dict.fromkeys(layer_types):
            params = config.rope_parameters[layer_type] if family.sliding == "layer_types" else config.rope_parameters
            rope_type = params.get("rope_type", "default")
            if rope_type not in STATIC_ROPE_TYPES:
                raise CheckpointError(f"{source}: rope_type={rope_type!r} is not supported; use one of "
                                      f"{', '.join(STATIC_ROPE_TYPES)}.")
        scale_key = family.attn_scale_key
        return cls(
            model_type=kind,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            activation=getattr(config, family.activation_key),
            layer_types=layer_types,
            sliding_window=window,
            attn_scale=getattr(config, scale_key) ** -0.5 if scale_key else None,
            family=family,
        )


# ---- a layer's weights: their shapes and their Hugging Face names ----------------------------------


def layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape of each weight of a layer (matrices (out, in) like nn.Linear), for the family's weights."""
    d, q, kv, inter = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, \
        args.intermediate_size
    shapes = {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (inter, d), "up": (inter, d),
              "down": (d, inter), "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "q_norm": (args.head_dim,),
              "k_norm": (args.head_dim,), **dict.fromkeys(LAYER_NORMS, (d,))}
    return {name: shapes[name] for name in args.family.names}


def hf_layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The HF tensors of a layer and their shapes (fused matrices stack their parts' rows)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in layer_shapes(args).items():
        hf = args.family.names[name]
        out[hf] = (out[hf][0] + shape[0], *shape[1:]) if hf in out else shape
    return out


def split_layer(args: ModelArgs, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A layer's HF tensors -> its weights by name (views of the fused matrices' rows)."""
    shapes, parts = layer_shapes(args), {}
    for name, hf in args.family.names.items():
        parts.setdefault(hf, []).append(name)
    out = {}
    for hf, names in parts.items():
        out.update(zip(names, tensors[hf].split([shapes[n][0] for n in names])))
    return out


def fuse_layer(args: ModelArgs, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A layer's weights by name -> its HF tensors (the inverse of `split_layer`)."""
    parts: dict[str, list[Tensor]] = {}
    for name, hf in args.family.names.items():
        parts.setdefault(hf, []).append(weights[name])
    return {hf: ts[0] if len(ts) == 1 else torch.cat(ts) for hf, ts in parts.items()}

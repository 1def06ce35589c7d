"""A compact Llama-family decoder: Llama-2/3, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k-norm), Mistral.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...), so a local HF
checkpoint loads with a plain `load_state_dict` and exports need no renaming. The layer maths is
written once, as functions of a `LayerWeights` bundle: the teacher runs it with its own weights,
and the LRC student (lrc.py) runs the very same code with generated weights `W_T @ P`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lrc_dist.indexed_dataset import sampled_digest

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# Rope types whose frequencies are fixed at load time; "dynamic"/"longrope" change with the length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
INVALID_CONFIG = (ValueError, TypeError, StrictDataclassError)  # what transformers' config validation raises


class CheckpointError(ValueError):
    """A model directory that cannot be used: the message names the file and the fix."""


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a decoder, read from an HF config (see `ModelArgs.from_hf`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, config: PretrainedConfig, source: str = "config.json") -> "ModelArgs":
        kind = config.model_type
        if kind not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported architecture model_type={kind!r}; lrc_dist supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)."
            )
        if config.hidden_act != "silu":
            raise CheckpointError(f"{source}: hidden_act={config.hidden_act!r}; only SwiGLU ('silu') is supported.")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            # Qwen2's q/k/v bias is implicit in its model_type; an o_proj/MLP bias is not supported.
            raise CheckpointError(f"{source}: attention_bias/mlp_bias=true (o_proj/MLP biases) is not supported.")
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise CheckpointError(
                f"{source}: rope_type={rope_type!r} is not supported; use one of {', '.join(STATIC_ROPE_TYPES)}."
            )
        window = None
        if kind == "mistral":
            window = config.sliding_window
        elif getattr(config, "use_sliding_window", False):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported for {kind}; set it to false.")
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
            qkv_bias=kind == "qwen2",
            qk_norm=kind == "qwen3",
            tie_word_embeddings=bool(config.tie_word_embeddings),
            sliding_window=window,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in fp32, scale in the input dtype: the same rounding as transformers. The weight is
    # cast so that fp32 master weights (LRC's student norms) keep bf16 activations bf16.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * xf.to(x.dtype)


class Rotary:
    """RoPE tables. Frequencies come from transformers' own rope functions (llama3, yarn, ...)."""

    def __init__(self, config: PretrainedConfig, head_dim: int):
        rope_type = config.rope_parameters.get("rope_type", "default")
        with torch.device("cpu"):  # real tensors even when the model is built on the meta device
            if rope_type == "default":
                theta = config.rope_parameters["rope_theta"]
                self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
                self.scale = 1.0
            else:
                self.inv_freq, self.scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        pos = torch.arange(seq_len, device=device, dtype=torch.float)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerWeights:
    """Everything one decoder layer computes with. Weights are (out, in) like nn.Linear."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor
    attn_norm: Tensor
    mlp_norm: Tensor
    eps: float
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None


def attention_mix(x: Tensor, w: LayerWeights, args: ModelArgs, rope: tuple[Tensor, Tensor], taps: dict | None) -> Tensor:
    """Causal self-attention up to (not including) o_proj: [B, T, d] -> [B, T, heads*head_dim].

    `taps`, when given, receives the q/k/v projections (before q/k-norm and RoPE).
    """
    B, T, _ = x.shape
    q, k, v = F.linear(x, w.q, w.q_bias), F.linear(x, w.k, w.k_bias), F.linear(x, w.v, w.v_bias)
    if taps is not None:
        taps.update(q=q, k=k, v=v)
    q = q.view(B, T, args.num_heads, args.head_dim)
    k = k.view(B, T, args.num_kv_heads, args.head_dim)
    v = v.view(B, T, args.num_kv_heads, args.head_dim)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, w.eps), rms_norm(k, w.k_norm, w.eps)
    cos, sin = rope
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = sliding_window_mask(T, args.sliding_window, x.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=args.num_kv_heads != args.num_heads
    )
    return out.transpose(1, 2).reshape(B, T, args.num_heads * args.head_dim)


def sliding_window_mask(seq_len: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean keep-mask for Mistral's sliding window; None (plain causal) when it cannot bite."""
    if window is None or seq_len <= window:
        return None
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


def swiglu(x: Tensor, w: LayerWeights, taps: dict | None) -> Tensor:
    """The FFN before down_proj: silu(gate) * up. `taps` receives gate and up (pre-activation)."""
    gate, up = F.linear(x, w.gate), F.linear(x, w.up)
    if taps is not None:
        taps.update(gate=gate, up=up)
    return F.silu(gate) * up


def decoder_layer(x: Tensor, w: LayerWeights, args: ModelArgs, rope: tuple[Tensor, Tensor], taps: dict | None = None) -> Tensor:
    """One pre-norm decoder layer. `taps` also receives attn_out (after o) and ffn_out (after down)."""
    attn_out = F.linear(attention_mix(rms_norm(x, w.attn_norm, w.eps), w, args, rope, taps), w.o)
    h = x + attn_out
    ffn_out = F.linear(swiglu(rms_norm(h, w.mlp_norm, w.eps), w, taps), w.down)
    if taps is not None:
        taps.update(attn_out=attn_out, ffn_out=ffn_out)
    return h + ffn_out


# ---- modules with Hugging Face parameter names ---------------------------------------------------


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, q_dim, kv_dim = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def weights(self) -> LayerWeights:
        a, m = self.self_attn, self.mlp
        w = LayerWeights(
            q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight, o=a.o_proj.weight,
            gate=m.gate_proj.weight, up=m.up_proj.weight, down=m.down_proj.weight,
            attn_norm=self.input_layernorm.weight, mlp_norm=self.post_attention_layernorm.weight,
            eps=self.input_layernorm.eps,
            q_bias=a.q_proj.bias, k_bias=a.k_proj.bias, v_bias=a.v_proj.bias,
        )
        if self.args.qk_norm:
            w.q_norm, w.k_norm = a.q_norm.weight, a.k_norm.weight
        return w

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], taps: dict | None = None) -> Tensor:
        return decoder_layer(x, self.weights(), self.args, rope, taps)


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder with an LM head; `CausalLM.from_pretrained(dir)` loads a local HF checkpoint."""

    def __init__(self, args: ModelArgs, hf_config: PretrainedConfig):
        super().__init__()
        self.args = args
        self.hf_config = hf_config
        self.rotary = Rotary(hf_config, args.head_dim)
        self.model = DecoderModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids: Tensor, checkpoint_layers: bool = False) -> Tensor:
        """Final-normed hidden states [B, T, d]; `checkpoint_layers` recomputes each layer in
        backward instead of keeping its activations (only when autograd records)."""
        h = self.model.embed_tokens(input_ids)
        rope = self.rotary.tables(input_ids.shape[1], h.device, h.dtype)
        recompute = checkpoint_layers and torch.is_grad_enabled()
        for layer in self.model.layers:
            h = checkpoint(layer, h, rope, use_reentrant=False) if recompute else layer(h, rope)
        return self.model.norm(h)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.linear(self.hidden_states(input_ids), self.lm_head_weight)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "CausalLM":
        hf_config = load_config(path)
        args = ModelArgs.from_hf(hf_config, str(Path(path) / "config.json"))
        with torch.device("meta"):  # no memory, no random init: the checkpoint fills every tensor
            model = cls(args, hf_config)
        state = read_safetensors(path, dtype=dtype, device=device)
        load_checked(model, state, path)
        return model


def resized_config(config: PretrainedConfig, hidden_size: int, head_dim: int, rms_norm_eps: float,
                   tie_word_embeddings: bool) -> PretrainedConfig:
    """`config` at another width; head_dim is explicit since it no longer equals hidden / heads.
    A width that transformers' config class rejects (Llama: not a multiple of the head count) is a
    ValueError naming the nearest widths it accepts, so that no run trains a student it cannot export."""

    def resized(width: int) -> PretrainedConfig:
        new = copy.deepcopy(config)
        new.hidden_size, new.head_dim = width, head_dim
        new.rms_norm_eps, new.tie_word_embeddings = rms_norm_eps, tie_word_embeddings
        new.validate()
        return new

    try:
        return resized(hidden_size)
    except INVALID_CONFIG as e:
        reason = str(e).strip().splitlines()[-1].strip()

    def accepted(width: int) -> bool:
        try:
            return bool(resized(width))
        except INVALID_CONFIG:
            return False

    below = next((w for w in range(hidden_size - 1, 0, -1) if accepted(w)), None)
    above = next((w for w in range(hidden_size + 1, config.hidden_size + 1) if accepted(w)), None)
    near = " or ".join(str(w) for w in (below, above) if w is not None) or "none"
    raise ValueError(f"student width {hidden_size}: transformers' {type(config).__name__} "
                     f"rejects it ({reason}), so the student could not be exported; nearest widths that work: {near}.")


# ---- loading local checkpoints ------------------------------------------------------------------


def load_config(path: str | Path) -> PretrainedConfig:
    """The HF config of a local checkpoint directory (never the hub)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; pass the directory of a local Hugging Face checkpoint.")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path / 'config.json'} cannot be read as a Hugging Face config: {e}") from e


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards named by its index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}.")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    hint = " (found PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))" if list(
        path.glob("*.bin")
    ) else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}.")


def read_safetensors(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(dtype)
        except SafetensorError as e:  # truncated or corrupt: say which file, not just the library's words
            raise CheckpointError(f"{file} cannot be read ({e}): it is truncated or corrupt; copy or download it "
                                  f"again.") from None
    return state


def teacher_fingerprint(path: str | Path) -> str:
    """A short identity of a checkpoint directory's model: sha256 of its config.json and of each
    weight file's name, size and sampled blocks (seconds even for a 7B model, not a full read).
    Stored with what was trained against a teacher, so that another teacher at that path is caught."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; pass the directory of a local Hugging Face checkpoint.")
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        digest.update(f"{file.name}:{file.stat().st_size}:{sampled_digest(file)}".encode())
    return digest.hexdigest()[:16]


def load_checked(module: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """`load_state_dict(assign=True)` with errors that say which tensor and why."""
    expected = module.state_dict(keep_vars=True)
    if "lm_head.weight" not in expected and "lm_head.weight" in state:
        head, embed = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not torch.equal(head, embed):
            raise CheckpointError(
                f"{source}: config.json says tie_word_embeddings=true, but the weights hold an lm_head.weight of "
                f"their own, unlike model.embed_tokens.weight: the head would be silently dropped. Set "
                f"tie_word_embeddings to false in {Path(source) / 'config.json'} if the head is separate.")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: config.json and weights disagree: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Check that config.json belongs to "
            f"these weights."
        )
    for key, param in expected.items():
        if tuple(param.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)} but config.json implies {tuple(param.shape)}."
            )
    module.load_state_dict(state, assign=True, strict=True)

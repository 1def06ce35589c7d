"""The decoder of every supported family (families.py): Llama-2/3, Mistral, Qwen2/2.5, Qwen3,
Gemma-3 (text) and Phi-3.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...), so a local HF
checkpoint loads with a plain `load_state_dict` and a trained student exports without renaming.
The layer is written once, `decoder_layer`, as a function of a layer's weights by name: the
teacher and the plain KD student run it with their own weights, and the LRC student (lrc.py) runs
the very same function with generated weights `W_T @ P`, reading its clone activations through
the layer's taps.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable
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

from lrc_dist.families import CheckpointError, ModelArgs, hf_layer_shapes, split_layer
from lrc_dist.indexed_dataset import sampled_digest

INVALID_CONFIG = (ValueError, TypeError, StrictDataclassError)  # what transformers' config validation raises

Weights = dict[str, Tensor]  # a layer's weights by name (families.layer_shapes), matrices (out, in)
# A tap sees an activation of the layer by name (q, k, v, gate, up, attn_out, ffn_out) and returns the
# value the layer goes on with: the teacher's taps record, LRC's may also map it (lrc.LowRankBlock).
Tap = Callable[[str, Tensor], Tensor]
Rope = tuple[Tensor, Tensor]


def rms_norm(x: Tensor, weight: Tensor, args: ModelArgs) -> Tensor:
    """Normalise in fp32. Llama-style: scale in the input dtype (transformers' rounding; the weight is
    cast so that fp32 master weights keep bf16 activations bf16). Gemma: x * (1 + w) in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + args.rms_norm_eps)
    if args.family.norm == "gemma":
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight.to(x.dtype) * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.full((args.hidden_size,), args.family.norm_init))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.args)


class Rotary:
    """RoPE tables per layer type (Gemma's local and global layers have their own bases). The
    frequencies come from transformers' own rope functions (llama3, yarn, linear, ...); a partial
    rotary factor rotates the first part of each head only (Phi-3)."""

    def __init__(self, config: PretrainedConfig, args: ModelArgs):
        per_type = args.family.sliding == "layer_types"
        self.freqs: dict[str, tuple[Tensor, float]] = {}
        with torch.device("cpu"):  # real tensors even when the model is built on the meta device
            for layer_type in dict.fromkeys(args.layer_types):
                params = config.rope_parameters[layer_type] if per_type else config.rope_parameters
                rope_type = params.get("rope_type", "default")
                if rope_type == "default":
                    dim = int(args.head_dim * params.get("partial_rotary_factor", 1.0))
                    inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
                    self.freqs[layer_type] = inv_freq, 1.0
                else:
                    kw = {"layer_type": layer_type} if per_type else {}
                    self.freqs[layer_type] = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kw)

    def tables(self, positions: Tensor, dtype: torch.dtype) -> dict[str, Rope]:
        """(cos, sin) per layer type for positions [T] ([T, rotary dim]) or [B, T] ([B, 1, T, rotary
        dim]: per sequence, broadcast over heads)."""
        out = {}
        for layer_type, (inv_freq, scale) in self.freqs.items():
            freqs = positions.float()[..., None] * inv_freq.to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            if emb.dim() == 3:
                emb = emb[:, None]
            out[layer_type] = (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        return out


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary: the rest of the head passes through
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = rotary // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def document_positions(input_ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """(document index, position in its document) [B, T] of packed windows whose documents end with
    `eos_id`: a document starts at the window's first token and after each EOS."""
    is_eos = input_ids == eos_id
    docs = is_eos.cumsum(-1) - is_eos.long()  # EOS tokens before each position
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    starts = torch.where(docs != F.pad(docs, (1, 0))[:, :-1], index, 0).cummax(-1).values
    return docs, index - starts


def attention_mask(seq_len: int, window: int | None, docs: Tensor | None, device: torch.device) -> Tensor | None:
    """Boolean keep-mask [T, T] (or [B, 1, T, T] per sequence's documents) of causal attention within
    a sliding window and within a document; None when it is plain causal attention."""
    if docs is None and (window is None or seq_len <= window):
        return None
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]
    keep = (dist >= 0) & (dist < window) if window is not None else dist >= 0
    if docs is not None:
        keep = keep & (docs[:, None, :, None] == docs[:, None, None, :])
    return keep


@dataclass
class Context:
    """What the layers of one forward share: RoPE tables per layer type and the attention mask per
    sliding window (None: plain causal). With document masking both follow the packed documents:
    positions restart after each EOS and no token attends across one."""

    rope: dict[str, Rope]
    masks: dict[int | None, Tensor | None]

    @classmethod
    def of(cls, rotary: "Rotary", args: ModelArgs, input_ids: Tensor, dtype: torch.dtype,
           document_eos: int | None = None) -> "Context":
        seq_len, device = input_ids.shape[1], input_ids.device
        if document_eos is None:
            docs, positions = None, torch.arange(seq_len, device=device)
        else:
            docs, positions = document_positions(input_ids, document_eos)
        windows = dict.fromkeys(args.window(i) for i in range(args.num_layers))
        return cls(rotary.tables(positions, dtype), {w: attention_mask(seq_len, w, docs, device) for w in windows})


def no_tap(name: str, value: Tensor) -> Tensor:
    return value


# The activations of the supported families, as the functions transformers' ACT2FN calls for them
# (SiLUActivation, GELUTanh, GELUActivation: F.silu, F.gelu(tanh), F.gelu). Importing
# transformers.activations costs about 3 s per process (it pulls in the hub-kernel machinery), so
# every trainer rank and every --help would pay it; any other name is ACT2FN's, imported then.
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The MLP activation of that config name (silu, gelu_pytorch_tanh, ...), as transformers
    computes it. A plain dict, not functools.cache, which torch.compile warns about; DecoderLayer
    fills it when built, so that compiled code only reads it."""
    if name not in _ACTIVATIONS:
        from transformers.activations import ACT2FN

        _ACTIVATIONS[name] = ACT2FN[name]
    return _ACTIVATIONS[name]


def query_key_value(x: Tensor, w: Weights, args: ModelArgs, rope: Rope, tap: Tap) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, heads, T, head_dim] of the tokens x, after q/k-norm and RoPE. The q/k/v taps see
    the projections before them."""
    B, T, _ = x.shape
    q = tap("q", F.linear(x, w["q"], w.get("q_bias"))).view(B, T, args.num_heads, args.head_dim)
    k = tap("k", F.linear(x, w["k"], w.get("k_bias"))).view(B, T, args.num_kv_heads, args.head_dim)
    v = tap("v", F.linear(x, w["v"], w.get("v_bias"))).view(B, T, args.num_kv_heads, args.head_dim)
    if "q_norm" in w:
        q, k = rms_norm(q, w["q_norm"], args), rms_norm(k, w["k_norm"], args)
    cos, sin = rope
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q: Tensor, k: Tensor, v: Tensor, args: ModelArgs, mask: Tensor | None) -> Tensor:
    """Attention of q [B, heads, Tq, hd] over k, v [B, kv heads, Tk, hd] -> [B, Tq, heads * hd];
    `mask`: a keep-mask, None for causal attention over as many keys as queries."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=args.attn_scale,
                                         enable_gqa=args.num_kv_heads != args.num_heads)
    B, _, T, _ = q.shape
    return out.transpose(1, 2).reshape(B, T, args.num_heads * args.head_dim)


def attention(x: Tensor, w: Weights, args: ModelArgs, rope: Rope, mask: Tensor | None, tap: Tap) -> Tensor:
    """Causal self-attention up to (not including) o_proj: [B, T, d] -> [B, T, heads * head_dim].
    The q/k/v taps see the projections before q/k-norm and RoPE."""
    return attend(*query_key_value(x, w, args, rope, tap), args, mask)


Attention = Callable[[Tensor, Weights, ModelArgs, Rope, "Tensor | None", Tap], Tensor]  # `attention`'s signature


def decoder_layer(x: Tensor, w: Weights, args: ModelArgs, rope: Rope, mask: Tensor | None,
                  tap: Tap = no_tap, attn: Attention = attention) -> Tensor:
    """One decoder layer of any family: pre-norm attention and gated MLP, each with its optional
    post-norm (Gemma). `tap` sees q, k, v, gate, up (before their activation), attn_out (after o)
    and ffn_out (after down), both before a post-norm. `mask`: the keep-mask of the layer's
    attention (`Context.masks`), None for plain causal attention. `attn`: the attention (the
    sampler's attends over its KV cache too, `sampling.CachedAttention`)."""
    attn_out = tap("attn_out", F.linear(attn(rms_norm(x, w["attn_norm"], args), w, args, rope, mask, tap), w["o"]))
    if "attn_post_norm" in w:
        attn_out = rms_norm(attn_out, w["attn_post_norm"], args)
    h = x + attn_out
    m = rms_norm(h, w["mlp_norm"], args)
    gate, up = tap("gate", F.linear(m, w["gate"])), tap("up", F.linear(m, w["up"]))
    ffn_out = tap("ffn_out", F.linear(activation(args.activation)(gate) * up, w["down"]))
    if "mlp_post_norm" in w:
        ffn_out = rms_norm(ffn_out, w["mlp_post_norm"], args)
    return h + ffn_out


# ---- modules with Hugging Face parameter names ---------------------------------------------------


def add_parameter(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    """Register `param` under the dotted name (e.g. self_attn.q_proj.weight), making the submodules."""
    *path, name = dotted.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(name, param)


def get_parameter(module: nn.Module, dotted: str) -> Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class DecoderLayer(nn.Module):
    """Layer `index`'s weights under their Hugging Face names (its state_dict is the checkpoint's)."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.args, self.index = args, index
        self.layer_type, self.window = args.layer_types[index], args.window(index)
        activation(args.activation)  # resolved here, outside any compiled forward
        norms = {args.family.names[n] for n in args.family.names if "norm" in n}
        shapes = hf_layer_shapes(args)
        self.hf_names = tuple(shapes)
        for hf, shape in shapes.items():
            add_parameter(self, hf, nn.Parameter(torch.full(shape, args.family.norm_init if hf in norms else 0.0)))

    def weights(self) -> Weights:
        return split_layer(self.args, {hf: get_parameter(self, hf) for hf in self.hf_names})

    def forward(self, x: Tensor, ctx: Context, tap: Tap = no_tap, attn: Attention = attention) -> Tensor:
        return decoder_layer(x, self.weights(), self.args, ctx.rope[self.layer_type], ctx.masks[self.window], tap,
                             attn)


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args)


class CausalLM(nn.Module):
    """A decoder with an LM head; `CausalLM.from_pretrained(dir)` loads a local HF checkpoint."""

    def __init__(self, args: ModelArgs, hf_config: PretrainedConfig):
        super().__init__()
        self.args = args
        self.hf_config = hf_config
        self.rotary = Rotary(hf_config, args)
        self.document_eos: int | None = None  # set: attention and positions per document (data.document_mask)
        self.model = DecoderModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.args.scale_embeddings(self.model.embed_tokens(input_ids))

    def hidden_states(self, input_ids: Tensor, checkpoint_layers: bool = False) -> Tensor:
        """Final-normed hidden states [B, T, d]; `checkpoint_layers` recomputes each layer in
        backward instead of keeping its activations (only when autograd records)."""
        h = self.embed(input_ids)
        ctx = Context.of(self.rotary, self.args, input_ids, h.dtype, self.document_eos)
        recompute = checkpoint_layers and torch.is_grad_enabled()
        for layer in self.model.layers:
            h = checkpoint(layer, h, ctx, use_reentrant=False) if recompute else layer(h, ctx)
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

"""Low-Rank Clone: a student generated from a frozen teacher through trainable projections.

Every student weight is a teacher weight times a projection P (d_T, d_S): input-side matrices
(q, k, v, gate, up, embedding, lm_head) become W_T @ P, output-side ones (o, down) P^T @ W_T.
Teacher and student run layer by layer in one `LowRankBlock`, which also returns the activation
clone terms (MSE between their q, k, v, gate, up, attention and FFN outputs). The block is the unit
that FSDP/ZeRO shard and checkpoint; this file knows nothing of distribution.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

from lrc_dist.dskd import DualSpaceProjector
from lrc_dist.families import LAYER_NORMS, ModelArgs, fuse_layer, layer_shapes
from lrc_dist.interface import ExtraPart, Matmul, StudentPart
from lrc_dist.losses import IGNORE_INDEX, LossConfig, logit_losses
from lrc_dist.metrics import lrc_flops_per_token
from lrc_dist.model import (
    CausalLM,
    CheckpointError,
    DecoderLayer,
    Context,
    RMSNorm,
    Weights,
    add_parameter,
    decoder_layer,
    get_parameter,
    resized_config,
    teacher_fingerprint,
)

CLONE_TERMS = ("q", "k", "v", "gate", "up", "attn_out", "ffn_out")
INPUT_SIDE = ("q", "k", "v", "gate", "up")  # student weight W_T @ P; output side (o, down) is P^T @ W_T
MATRICES = (*INPUT_SIDE, "o", "down")  # a layer's student matrices: free parameters in the dense phase
TARGET_PROJECTIONS = {"attn_out": "o", "ffn_out": "down"}  # the dense phase keeps these, for the clone targets


CloneTerm = Literal["q", "k", "v", "gate", "up", "attn_out", "ffn_out"]
ProjectionInit = Literal["random", "activation", "channels", "svd"]  # lrc.init (lrc_dist/projection_init.py)
INITS = get_args(ProjectionInit)


@dataclass
class LRCConfig:
    """The LRC student: its width and the activation clone terms."""

    student_hidden_size: int = 0
    """d_S, the student's hidden size (at most the teacher's; LRC and the default KD student need it)"""
    rms_norm_eps: float | None = None
    """eps of the student's RMSNorms; null keeps the teacher's"""
    clone_terms: tuple[CloneTerm, ...] = CLONE_TERMS
    """which activation clone terms to compute"""
    attn_out_space: Literal["student", "teacher"] = "student"
    """student: attention output compared as o_S vs o_T @ P_o (paper, Algorithm 1); teacher: the
    student's attention mixed through the teacher's o_proj vs o_T (reference code)"""
    shared_attn_proj: bool = False
    """the paper's "IO" attention: one input projection for q, k, v"""
    shared_ffn_proj: bool = False
    """the paper's "IO" FFN: one input projection for gate, up"""
    init: ProjectionInit = "random"
    """where the projections start (lrc_dist/projection_init.py): random: N(0, init_std), as in the
    paper; the others derive every projection from one basis of the teacher's residual stream:
    activation: its principal directions on init_samples windows of the training data; channels:
    its d_S channels of most energy there (RED's channel selection); svd: the principal
    directions of the teacher weights that read and write it (no data)"""
    init_samples: int = 16
    """activation, channels: the calibration windows (data.seq_len tokens each), the first ones of
    the training stream"""
    init_std: float = 0.02
    """init=random: projections ~ N(0, init_std), as in the reference"""
    clone_term_weights: dict[str, float] = field(default_factory=dict)
    """a weight per clone term; missing terms weigh 1"""
    dense_after: float | None = None
    """the dense phase ("Train What You Deploy"): after this many steps (>= 1), or this fraction of
    `steps` (< 1; 0: from the start), every student matrix (q, k, v, o, gate, up, down, embedding,
    head) becomes a free parameter, initialised to its W_T @ P (P^T @ W_T) of that moment, and
    trains from there. The clone terms stay: the attention and FFN targets are still mapped
    through P_o and P_down (dense_projections); the other projections are dropped. The switch
    rebuilds the model and a fresh optimizer (the teacher is read again); null: LRC throughout"""
    dense_projections: Literal["train", "freeze"] = "train"
    """the dense phase's P_o and P_down, which map the attention/FFN clone targets: train (on the
    clone terms alone) or freeze"""
    dense_lr_scale: float = 1.0
    """the dense phase: the student matrices' learning rate is the schedule's times this"""

    def __post_init__(self):
        self.clone_terms = tuple(self.clone_terms)
        unknown = set(self.clone_terms) - set(CLONE_TERMS)
        if unknown:
            raise ValueError(f"lrc.clone_terms: unknown {sorted(unknown)}; choose from {CLONE_TERMS}.")
        if self.attn_out_space not in ("student", "teacher"):
            raise ValueError(f"lrc.attn_out_space={self.attn_out_space!r}; use 'student' or 'teacher'.")
        if self.init not in INITS:
            raise ValueError(f"lrc.init={self.init!r}; use one of {', '.join(INITS)}.")
        if self.dense_after is not None:
            if self.dense_after < 0 or (self.dense_after >= 1 and self.dense_after != int(self.dense_after)):
                raise ValueError(f"lrc.dense_after={self.dense_after}: use a step count (a whole number >= 1), a "
                                 f"fraction of the steps in [0, 1), or null for no dense phase.")
            if self.attn_out_space == "teacher":
                raise ValueError("lrc.dense_after: the dense phase compares the attention output in the student's "
                                 "space; set lrc.attn_out_space=student.")
        if self.dense_projections not in ("train", "freeze"):
            raise ValueError(f"lrc.dense_projections={self.dense_projections!r}; use 'train' or 'freeze'.")

    def dense_step(self, steps: int) -> int | None:
        """The step after which the dense phase starts (`dense_after` of a run of `steps`), or None."""
        if self.dense_after is None:
            return None
        return round(self.dense_after * steps) if self.dense_after < 1 else int(self.dense_after)

    def projection_name(self, matrix: str) -> str:
        """The projection a matrix uses: its own, or the shared one of the IO variants."""
        if self.shared_attn_proj and matrix in ("q", "k", "v"):
            return "attn_in"
        if self.shared_ffn_proj and matrix in ("gate", "up"):
            return "ffn_in"
        return matrix


def masked_mse(a: Tensor, b: Tensor, valid: Tensor | None) -> Tensor:
    """MSE over the features of the positions marked `valid` [B, T] (all when None): the clone terms
    count the tokens the LM and KL terms count, so that splitting a batch into micro-batches
    (weighted by their labelled tokens) gives the same loss and gradient."""
    per_position = (a.float() - b.float()).pow(2).mean(-1)
    if valid is None:
        return per_position.mean()
    valid = valid.to(per_position.dtype)
    return (per_position * valid).sum() / valid.sum().clamp(min=1)


def freeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)



@dataclass
class LRCOutput:
    teacher_hidden: Tensor  # [B, T, d_T], final-normed, no grad
    student_hidden: Tensor  # [B, T, d_S], final-normed
    clone: dict[str, Tensor]  # per clone term, the MSE summed over layers


class LowRankBlock(nn.Module):
    """One LRC layer: the frozen teacher layer, its projections and the student's norms (those of
    the family's layer at width d_S, under the same HF names)."""

    def __init__(self, teacher: DecoderLayer, cfg: LRCConfig, student_args: ModelArgs):
        super().__init__()
        self.cfg = cfg
        self.teacher = freeze(teacher)
        self.student_args = student_args
        d_t, d_s = teacher.args.hidden_size, cfg.student_hidden_size
        names = dict.fromkeys(cfg.projection_name(m) for m in ("q", "k", "v", "o", "gate", "up", "down"))
        self.proj = nn.ParameterDict({n: nn.Parameter(torch.empty(d_t, d_s)) for n in names})
        self.norm_names = {n: hf for n, hf in student_args.family.names.items() if n in LAYER_NORMS}
        for hf in self.norm_names.values():
            add_parameter(self, hf, nn.Parameter(torch.full((d_s,), student_args.family.norm_init)))
        self.activation_checkpointing = False
        self.generation_matmul: Matmul = torch.matmul  # see LowRankClone.set_generation_matmul
        self.dense: nn.ParameterDict | None = None  # the dense phase's student matrices (`densify`)

    def p(self, matrix: str) -> Tensor:
        """The projection of `matrix`, in the teacher's dtype (trainable tensors stay fp32 masters);
        in the dense phase a frozen one is a buffer of `frozen_proj`."""
        name = self.cfg.projection_name(matrix)
        p = self.proj[name] if name in self.proj else self.frozen_proj.get_buffer(name)
        return p.to(self.teacher_dtype)

    def kept_projections(self) -> list[str]:
        """The projections the dense phase keeps: those mapping a clone target it computes."""
        return [m for term, m in TARGET_PROJECTIONS.items() if term in self.cfg.clone_terms]

    def dense_state(self) -> dict[str, Tensor]:
        """This block's tensors in the dense phase, by their names there, from its LRC weights now:
        the matrices (`dense.q`, ...: W_T @ P in the parameters' dtype), the student norms and the
        kept projections (`proj.o` when they train, `frozen_proj.o` when frozen)."""
        w = self.student_weights()
        state = {f"dense.{m}": w[m] for m in MATRICES}
        state.update({hf: get_parameter(self, hf) for hf in self.norm_names.values()})
        where = "proj" if self.cfg.dense_projections == "train" else "frozen_proj"
        state.update({f"{where}.{m}": self.proj[m] for m in self.kept_projections()})
        return state

    def densify(self) -> None:
        """Switch to the dense phase's parameters: the student matrices become parameters (zeros
        here: `LowRankClone.densify` fills them), the projections not kept are dropped, the kept ones
        become buffers when `dense_projections=freeze`."""
        shapes = layer_shapes(self.student_args)
        self.dense = nn.ParameterDict({m: nn.Parameter(torch.zeros(shapes[m])) for m in MATRICES})
        kept = self.kept_projections()
        self.frozen_proj = nn.Module()
        if self.cfg.dense_projections == "freeze":
            for m in kept:
                self.frozen_proj.register_buffer(m, self.proj[m].detach().clone())
            kept = []
        self.proj = nn.ParameterDict({m: self.proj[m] for m in kept})

    @property
    def teacher_dtype(self) -> torch.dtype:
        return get_parameter(self.teacher, self.norm_names["attn_norm"]).dtype

    def student_weights(self, matmul: Matmul = torch.matmul, generate_o: bool = True) -> Weights:
        """The generated weights: W_T @ P, and P^T @ W_T = (W_T^T @ P)^T for o and down; biases and
        q/k-norms (per head) stay the teacher's. `generate_o=False` keeps the teacher's o (the
        attention output compared in the teacher's space). In the dense phase: the free matrices."""
        t = self.teacher.weights()
        w = dict(t)
        if self.dense is not None:
            w.update({m: d.to(self.teacher_dtype) for m, d in self.dense.items()})
            w.update({n: get_parameter(self, hf) for n, hf in self.norm_names.items()})
            return w
        w.update({m: matmul(t[m], self.p(m)) for m in INPUT_SIDE})
        w.update({m: matmul(t[m].T, self.p(m)).T for m in ("o", "down") if generate_o or m != "o"})
        w.update({n: get_parameter(self, hf) for n, hf in self.norm_names.items()})
        return w

    def teacher_forward(self, h_t: Tensor, ctx: Context) -> tuple[Tensor, dict[str, Tensor]]:
        taps: dict[str, Tensor] = {}

        def record(name: str, value: Tensor) -> Tensor:
            taps[name] = value
            return value

        with torch.no_grad():  # not inference_mode: FSDP must still unshard these weights
            return self.teacher(h_t, ctx, record), taps

    def student_forward(
        self, h_s: Tensor, teacher_taps: dict[str, Tensor], ctx: Context, valid: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's layer (the model's own `decoder_layer`, generated weights) and its clone
        terms: its q, k, v, gate, up against the teacher's, its attention and FFN outputs against
        the teacher's mapped through P_o and P_down."""
        teacher_space = self.cfg.attn_out_space == "teacher"
        w = self.student_weights(self.generation_matmul, generate_o=not teacher_space)
        taps: dict[str, Tensor] = {}

        def record(name: str, value: Tensor) -> Tensor:
            taps[name] = value
            # teacher space: the student's attention mixed through the teacher's o_proj, then into d_S
            return value @ self.p("o") if name == "attn_out" and teacher_space else value

        out = decoder_layer(h_s, w, self.student_args, ctx.rope[self.teacher.layer_type], ctx.masks[self.teacher.window],
                            record)
        terms = self.cfg.clone_terms
        targets = {m: teacher_taps[m] for m in INPUT_SIDE}
        if "attn_out" in terms:
            targets["attn_out"] = teacher_taps["attn_out"] if teacher_space else teacher_taps["attn_out"] @ self.p("o")
        if "ffn_out" in terms:
            targets["ffn_out"] = teacher_taps["ffn_out"] @ self.p("down")
        return out, {m: masked_mse(taps[m], targets[m], valid) for m in terms}

    def forward(self, h_t: Tensor, h_s: Tensor, ctx: Context, valid: Tensor | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h_t_next, teacher_taps = self.teacher_forward(h_t, ctx)
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Recompute only the student in backward; the teacher's taps are kept, never recomputed.
            h_s_next, clone = checkpoint(self.student_forward, h_s, teacher_taps, ctx, valid, use_reentrant=False)
        else:
            h_s_next, clone = self.student_forward(h_s, teacher_taps, ctx, valid)
        return h_t_next, h_s_next, clone


class LowRankClone(nn.Module):
    """Teacher and generated student side by side. Only projections and student norms train."""

    # A block reads its teacher weights directly (W_T @ P): ZeRO-3 must gather it as a whole.
    leaf_module_classes = (LowRankBlock,)
    cross_tokenizer = False  # the student inherits the teacher's vocabulary

    def __init__(self, teacher: CausalLM, cfg: LRCConfig):
        super().__init__()
        args = teacher.args
        d_t, d_s = args.hidden_size, cfg.student_hidden_size
        if not 0 < d_s <= d_t:
            raise ValueError(f"lrc.student_hidden_size={d_s} must be in 1..{d_t} (the teacher's hidden_size).")
        self.cfg = cfg
        self.teacher_args = args
        self.hf_config = teacher.hf_config
        self.eps = args.rms_norm_eps if cfg.rms_norm_eps is None else cfg.rms_norm_eps
        self.student_hf_config()  # a width transformers cannot export fails now, not after training
        self.rotary = teacher.rotary
        self.document_eos: int | None = None  # set: attention and positions per document (data.document_mask)
        self.teacher_embed = freeze(teacher.model.embed_tokens)
        self.embed_proj = nn.Parameter(torch.empty(d_t, d_s))
        student = self.student_args()
        self.layers = nn.ModuleList(LowRankBlock(layer, cfg, student) for layer in teacher.model.layers)
        self.teacher_norm = freeze(teacher.model.norm)
        self.norm = RMSNorm(student)
        if not args.tie_word_embeddings:
            self.teacher_lm_head = freeze(teacher.lm_head)
            self.lm_head_proj = nn.Parameter(torch.empty(d_t, d_s))
        self.dual_space: DualSpaceProjector | None = None
        self.generation_matmul: Matmul = torch.matmul
        self.generation_ranks = 1  # devices sharing the generation (for the FLOP count)
        self.dense = False  # the dense phase (`densify`): free student matrices instead of W_T @ P

    def set_generation_matmul(self, matmul: Matmul, ranks: int = 1) -> None:
        """How the training forward generates the student weights; `ranks` devices share the work
        (parallel.sharded_matmul). Materialising the student (`student_state_dict`) never uses it."""
        self.generation_matmul, self.generation_ranks = matmul, ranks
        for block in self.layers:
            block.generation_matmul = matmul

    def set_document_mask(self, eos_id: int | None) -> None:
        """Attention and RoPE positions per document of a packed window (documents end with
        `eos_id`), for teacher and student alike; None: the whole window is one sequence."""
        self.document_eos = eos_id

    def enable_dual_space(self) -> None:
        """Add the DSKD projector (loss.dskd_weight), ideally initialised from the two heads: call
        after `init_weights`, whose projections define the student head."""
        w_t = self.teacher_head_weight()
        with torch.no_grad():
            w_s = self.student_head_weight().float()
        self.dual_space = DualSpaceProjector(w_t.shape[1], w_s.shape[1]).ideal_init_(w_t, w_s)

    @classmethod
    def from_teacher(cls, path: str | Path, cfg: LRCConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> "LowRankClone":
        if cfg.init != "random":
            raise ValueError(f"lrc.init={cfg.init}: from_teacher draws random projections; build the model with "
                             f"build.build_model, or call projection_init.init_from_teacher on it.")
        model = cls(CausalLM.from_pretrained(path, dtype=dtype), cfg)
        model.init_weights(seed)
        return model

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Projections ~ N(0, init_std), student norms scaling by 1 (lrc.init=random; the other inits
        are projection_init's). Deterministic in `seed`."""
        g = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("norm.weight"):
                param.fill_(self.teacher_args.family.norm_init)
            else:
                param.copy_(torch.randn(param.shape, generator=g) * self.cfg.init_std)

    def teacher_head_weight(self) -> Tensor:
        return self.teacher_embed.weight if self.teacher_args.tie_word_embeddings else self.teacher_lm_head.weight

    def student_head_weight(self, matmul: Matmul = torch.matmul) -> Tensor:
        if self.dense:
            head = self.embed_dense if self.teacher_args.tie_word_embeddings else self.lm_head_dense
            return head.to(self.teacher_embed.weight.dtype)
        proj = self.embed_proj if self.teacher_args.tie_word_embeddings else self.lm_head_proj
        teacher = self.teacher_head_weight()
        return matmul(teacher, proj.to(teacher.dtype))

    def forward(
        self, input_ids: Tensor, labels: Tensor, loss_cfg: LossConfig, normalizer: float | None = None,
        lm_labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training step's forward: lockstep pass and loss (see `lrc_loss`); `lm_labels`: the LM
        term's labels where they are not `labels` (on-policy windows, lrc_dist.on_policy).

        The loss is computed here, inside the root module's forward, because FSDP2 and ZeRO-3 only
        gather the vocabulary-sized head weights while that forward runs.
        """
        return lrc_loss(self, self.lockstep(input_ids, labels != IGNORE_INDEX), labels, loss_cfg, normalizer,
                        lm_labels)

    def lockstep(self, input_ids: Tensor, valid: Tensor | None = None) -> LRCOutput:
        """Teacher and student side by side through all layers; no loss."""
        with torch.no_grad():
            e = self.teacher_embed(input_ids)
        if self.dense:
            h_s = F.embedding(input_ids, self.embed_dense).to(e.dtype)
        else:  # gather rows first: (tokens x d_T) @ P instead of materialising the (vocab x d_S) embedding
            h_s = e @ self.embed_proj.to(e.dtype)
        # A scaled embedding (Gemma: sqrt(width)) scales each model by its own width, as its export does.
        h_t, h_s = self.teacher_args.scale_embeddings(e), self.student_args().scale_embeddings(h_s)
        ctx = Context.of(self.rotary, self.teacher_args, input_ids, h_s.dtype, self.document_eos)
        clone: dict[str, Tensor] = {}
        for block in self.layers:
            h_t, h_s, terms = block(h_t, h_s, ctx, valid)
            for name, value in terms.items():
                clone[name] = clone[name] + value if name in clone else value
        with torch.no_grad():
            h_t = self.teacher_norm(h_t)
        return LRCOutput(h_t, self.norm(h_s), clone)

    # ---- what the trainer and the backends use ---------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The vocabulary of the input tokens."""
        return self.teacher_args.vocab_size

    def flops_per_token(self, seq_len: int, tokens_per_forward: int) -> float:
        """Model FLOPs of one trained token on one device (metrics.lrc_flops_per_token)."""
        dense = (self.cfg.dense_projections, self.layers[0].kept_projections()) if self.dense else None
        return lrc_flops_per_token(self.teacher_args, self.cfg.student_hidden_size, seq_len, tokens_per_forward,
                                   self.generation_ranks, dense)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for block in self.layers:
            block.activation_checkpointing = enabled

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)

    def external_params(self) -> list[Tensor]:
        """Weights the root forward reads outside their module's own forward."""
        dual_space = [self.dual_space.t2s] if self.dual_space is not None else []
        return [self.teacher_embed.weight, self.teacher_head_weight(), *dual_space]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable parameters, and in the dense phase the frozen target projections (buffers,
        saved with them)."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        state.update({n: b for n, b in self.named_buffers() if ".frozen_proj." in f".{n}"})
        return state

    # ---- the dense phase ---------------------------------------------------------------------------

    def dense_parts(self) -> Iterator[StudentPart]:
        """The tensors of the dense phase (`densify`), under their names there, computed from this
        LRC model part by part, in the parameters' dtype: the embedding (W_T @ P) with the final norm,
        each block (`LowRankBlock.dense_state`), the head, the DSKD projector. Like `student_parts`:
        a sharded model is gathered one part at a time (train.dense_state)."""
        if self.dense:
            raise ValueError("the model is in its dense phase already")
        yield ["teacher_embed.weight", "embed_proj", "norm.weight"], lambda: {
            "embed_dense": self.teacher_embed.weight @ self.embed_proj.to(self.teacher_embed.weight.dtype),
            "norm.weight": self.norm.weight}
        for i, block in enumerate(self.layers):
            yield [n for n, _ in block.named_parameters(prefix=f"layers.{i}")], functools.partial(
                lambda i, block: {f"layers.{i}.{k}": v for k, v in block.dense_state().items()}, i, block)
        if not self.teacher_args.tie_word_embeddings:
            yield ["teacher_lm_head.weight", "lm_head_proj"], lambda: {"lm_head_dense": self.student_head_weight()}
        if self.dual_space is not None:
            names = [f"dual_space.{n}" for n, _ in self.dual_space.named_parameters()]
            yield names, lambda: {f"dual_space.{n}": p for n, p in self.dual_space.named_parameters()}

    def densify(self, state: dict[str, Tensor] | None = None) -> None:
        """Enter the dense phase: the student's matrices become free parameters, set from `state`
        (what `dense_parts` computed, e.g. gathered from a sharded model), or from this model's
        own W_T @ P when None; with `state={}` they stay zeros (a trained state is loaded next)."""
        if state is None:
            with torch.no_grad():
                state = {k: v.float().clone() for _, part in self.dense_parts() for k, v in part().items()}
        vocab, d_s = self.teacher_args.vocab_size, self.cfg.student_hidden_size
        # Given a state, the new matrices are its tensors (assigned, not copied into a second
        # allocation: at 7B the student is 16 GiB in fp32); else zeros, for a state loaded next.
        with torch.device("meta" if state else self.embed_proj.device):
            for block in self.layers:
                block.densify()
            self.embed_dense = nn.Parameter(torch.zeros(vocab, d_s))
            if not self.teacher_args.tie_word_embeddings:
                self.lm_head_dense = nn.Parameter(torch.zeros(vocab, d_s))
        del self.embed_proj
        if not self.teacher_args.tie_word_embeddings:
            del self.lm_head_proj
        self.dense = True
        if state:
            expected = self.trainable_state_dict()
            if set(state) != set(expected):
                raise ValueError(f"densify: the state does not fit: missing {sorted(set(expected) - set(state))[:5]}, "
                                 f"extra {sorted(set(state) - set(expected))[:5]}")
            # contiguous: o and down come as transposes, and FSDP2 shards only contiguous parameters
            self.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=False, assign=True)

    def param_group(self, name: str) -> tuple[str, float]:
        """(optimizer group, learning rate as a multiple of the schedule's) of parameter `name`: the
        DSKD projector's own scale, lrc.dense_lr_scale for the dense phase's student matrices, else 1."""
        if name.startswith("dual_space."):
            return "dual_space", self.dual_space.lr_scale
        if name in ("embed_dense", "lm_head_dense") or ".dense." in name:
            return "dense", self.cfg.dense_lr_scale
        return "base", 1.0

    # ---- the student as an ordinary model --------------------------------------------------------

    def student_args(self) -> ModelArgs:
        return replace(self.teacher_args, hidden_size=self.cfg.student_hidden_size, rms_norm_eps=self.eps)

    def student_hf_config(self) -> PretrainedConfig:
        a = self.student_args()
        return resized_config(self.hf_config, a.hidden_size, a.head_dim, a.rms_norm_eps, a.tie_word_embeddings)

    @torch.no_grad()
    def student_state_dict(self) -> dict[str, Tensor]:
        """Materialise the student once, under Hugging Face names: all of `student_parts`."""
        dtype = self.teacher_embed.weight.dtype
        return {k: v.detach().to(dtype).contiguous() for _, tensors in self.student_parts() for k, v in tensors().items()}

    def student_parts(self) -> Iterator[StudentPart]:
        """`student_state_dict`, in its order, as parts an export can gather one at a time: the
        embedding with the final norm, each block (families.fuse_layer names its tensors), the head.
        Tensors in the parameters' dtype."""
        student = self.student_args()

        def embedding() -> dict[str, Tensor]:
            if self.dense:
                return {"model.embed_tokens.weight": self.embed_dense, "model.norm.weight": self.norm.weight}
            w = self.teacher_embed.weight
            return {"model.embed_tokens.weight": w @ self.embed_proj.to(w.dtype), "model.norm.weight": self.norm.weight}

        def layer(i: int) -> dict[str, Tensor]:
            return {f"model.layers.{i}.{hf}": t for hf, t in fuse_layer(student, self.layers[i].student_weights()).items()}

        head = ["lm_head_dense"] if self.dense else ["teacher_lm_head.weight", "lm_head_proj"]
        yield (["embed_dense", "norm.weight"] if self.dense else ["teacher_embed.weight", "embed_proj", "norm.weight"]
               ), embedding
        for i, block in enumerate(self.layers):
            yield [n for n, _ in block.named_parameters(prefix=f"layers.{i}")], functools.partial(layer, i)
        if not self.teacher_args.tie_word_embeddings:
            yield head, lambda: {"lm_head.weight": self.student_head_weight()}

    def export_extras(self) -> list[ExtraPart]:
        """An LRC export also holds the trainable state (`save_lrc`, in `lrc/` of the export dir)."""
        # the dense phase's frozen projections are buffers, never sharded: only parameters are gathered
        trained = [n for n, p in self.named_parameters() if p.requires_grad]
        return [(trained, lambda out, teacher: save_lrc(self, out / "lrc", teacher))]


def lrc_loss(
    model: LowRankClone, out: LRCOutput, labels: Tensor, cfg: LossConfig, normalizer: float | None = None,
    lm_labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total LRC loss and its detached terms for logging.

    With a global `normalizer` (labelled tokens of the whole step, all ranks and micro-batches), the
    per-micro-batch clone MSE is weighted by this micro-batch's share of those tokens, so that
    summing losses (and gradients) over micro-batches and ranks gives the step's token mean.
    """
    local = (labels != IGNORE_INDEX).sum()
    share = 1.0 if normalizer is None else local / normalizer
    head, metrics = logit_losses(
        out.student_hidden.flatten(0, 1), model.student_head_weight(model.generation_matmul),
        out.teacher_hidden.flatten(0, 1), model.teacher_head_weight(),
        labels.flatten(), cfg, normalizer, model.dual_space, lm_labels.flatten() if lm_labels is not None else None,
    )
    weights = model.cfg.clone_term_weights
    clone = share * sum(weights.get(name, 1.0) * value for name, value in out.clone.items())
    total = head + cfg.clone_weight * clone
    metrics.update(loss=total, clone=clone)
    metrics.update({f"clone/{name}": share * value for name, value in out.clone.items()})
    return total, {k: torch.as_tensor(v).detach() for k, v in metrics.items()}


# ---- the trainable state on disk (what export reads) ---------------------------------------------

LRC_CONFIG_FILE, LRC_WEIGHTS_FILE = "lrc_config.json", "lrc_trainable.safetensors"


def save_lrc(model: LowRankClone, path: str | Path, teacher_path: str | Path) -> None:
    """Write the trainable tensors and the config; the teacher is referenced, never copied."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the student only: the DSKD projector is a training-time tool, no part of the student
    state = {k: v.contiguous() for k, v in model.trainable_state_dict().items() if not k.startswith("dual_space.")}
    save_file(state, str(path / LRC_WEIGHTS_FILE))
    meta = {"teacher": str(Path(teacher_path).resolve()), "teacher_fingerprint": teacher_fingerprint(teacher_path),
            "lrc": asdict(model.cfg), "dense": model.dense}
    (path / LRC_CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def check_teacher(teacher: str | Path, fingerprint: str | None, source: str | Path) -> None:
    """A CheckpointError when the teacher at `teacher` is not the one `source` was trained with."""
    if fingerprint is not None and teacher_fingerprint(teacher) != fingerprint:
        raise CheckpointError(f"{source} was trained with another teacher than the one in {teacher} (fingerprint "
                              f"{fingerprint}, now {teacher_fingerprint(teacher)}: its config.json or weights differ). "
                              f"Point it at the teacher the student was distilled from.")


def read_lrc_meta(path: str | Path) -> dict:
    """{"teacher": path, "lrc": LRCConfig fields} of a directory written by `save_lrc`."""
    file = Path(path) / LRC_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {LRC_CONFIG_FILE}; pass a directory written by lrc_dist.lrc.save_lrc.")
    return json.loads(file.read_text())


def load_lrc(path: str | Path, teacher_path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LowRankClone:
    """Rebuild a saved LRC model; `teacher_path` overrides the teacher directory recorded at save time."""
    path = Path(path)
    meta = read_lrc_meta(path)
    teacher = teacher_path or meta["teacher"]
    check_teacher(teacher, meta.get("teacher_fingerprint"), path / LRC_CONFIG_FILE)
    model = LowRankClone(CausalLM.from_pretrained(teacher, dtype=dtype), LRCConfig(**meta["lrc"]))
    if meta.get("dense"):
        model.densify({})
    try:
        state = {k: v.to(dtype) for k, v in load_file(str(path / LRC_WEIGHTS_FILE)).items()}
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{path / LRC_WEIGHTS_FILE} cannot be read ({e}): it is missing, truncated or "
                              f"corrupt.") from None
    expected = model.trainable_state_dict()
    if set(state) != set(expected):
        raise CheckpointError(f"{path / LRC_WEIGHTS_FILE} does not fit teacher {meta['teacher']}: "
                              f"missing {sorted(set(expected) - set(state))[:5]}, extra {sorted(set(state) - set(expected))[:5]}.")
    model.load_state_dict(state, strict=False)
    return model

"""Low-Rank Clone: a student generated from a frozen teacher through trainable projections.

Every student weight is a teacher weight times a projection P (d_T, d_S): input-side matrices
(q, k, v, gate, up, embedding, lm_head) become W_T @ P, output-side ones (o, down) P^T @ W_T.
Teacher and student run layer by layer in one `LowRankBlock`, which also returns the activation
clone terms (MSE between their q, k, v, gate, up, attention and FFN outputs). The block is the unit
that FSDP/ZeRO shard and checkpoint; this file knows nothing of distribution.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

from lrc_dist.dskd import DualSpaceProjector
from lrc_dist.families import LAYER_NORMS, ModelArgs, fuse_layer, layer_shapes
from lrc_dist.interface import ExtraPart, Matmul, StudentPart
from lrc_dist.losses import IGNORE_INDEX, LossConfig, aligned_logit_losses, logit_losses
from lrc_dist.lrc_config import INPUT_SIDE, MATRICES, TARGET_PROJECTIONS, LRCConfig
from lrc_dist.lrc_files import save_lrc
from lrc_dist.metrics import lrc_flops_per_token, projects_head
from lrc_dist.model import (
    CausalLM,
    DecoderLayer,
    Context,
    RMSNorm,
    Weights,
    add_parameter,
    decoder_layer,
    get_parameter,
    resized_config,
)
from lrc_dist.vocab import StudentVocab


class _WeightedSquares(torch.autograd.Function):
    """sum over positions of weight[pos] * sum over features of (a - b)^2, in fp32, with its
    gradient in closed form: 2 w (a - b) for a, minus that for b. Autograd's sub, pow, mean, mul
    and sum take some eight passes over the activations; this takes three (difference, squared
    norm; one product in backward) and keeps only the difference."""

    @staticmethod
    def forward(ctx, a, b, weight):
        diff = a.float() - b.float()
        ctx.save_for_backward(diff, weight)
        ctx.dtypes = a.dtype, b.dtype
        return (torch.linalg.vector_norm(diff, dim=-1).square() * weight).sum()

    @staticmethod
    def backward(ctx, grad):
        diff, weight = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if not (need_a or need_b):
            return None, None, None
        grad_diff = diff * (2 * grad * weight).unsqueeze(-1)
        grad_a = grad_diff.to(ctx.dtypes[0]) if need_a else None
        grad_b = -grad_diff.to(ctx.dtypes[1]) if need_b else None
        return grad_a, grad_b, None


def masked_mse(a: Tensor, b: Tensor, valid: Tensor | None) -> Tensor:
    """MSE over the features of the positions marked `valid` ([B, T], or [N] pairs; all when None):
    the clone terms count the tokens the LM and KL terms count, so that splitting a batch into
    micro-batches (weighted by their labelled tokens) gives the same loss and gradient."""
    positions = a.shape[:-1]
    if valid is None:
        weight = torch.full(positions, 1.0 / (max(positions.numel(), 1) * a.shape[-1]), device=a.device)
    else:
        valid = valid.to(torch.float32)
        weight = valid / (valid.sum().clamp(min=1) * a.shape[-1])
    return _WeightedSquares.apply(a, b, weight)


def freeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)



def pick(tap: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
    """The activations [N, F] of `tap` [B, T, F] at (rows[n], positions[n])."""
    return tap[rows, positions]


@dataclass
class LRCOutput:
    teacher_hidden: Tensor  # [B, T, d_T] (across tokenizers: [B, T_t, d_T]), final-normed, no grad
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
        self, h_s: Tensor, teacher_taps: dict[str, Tensor], ctx: Context, valid: Tensor | None = None,
        aligned: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's layer (the model's own `decoder_layer`, generated weights) and its clone
        terms: its q, k, v, gate, up against the teacher's, its attention and FFN outputs against
        the teacher's mapped through P_o and P_down. `aligned` = (rows, student positions): across
        tokenizers the terms compare those pairs only (means over them), `teacher_taps` [N, F]
        holding the teacher's activations at the same pairs (`forward`)."""
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
        if aligned is not None:
            rows, s_pos = aligned
            taps = {m: pick(taps[m], rows, s_pos) for m in terms}
            valid = torch.ones(len(rows), dtype=torch.bool, device=rows.device)  # no pairs: 0, not a NaN
        targets = {m: teacher_taps[m] for m in INPUT_SIDE if m in terms}
        if "attn_out" in terms:
            targets["attn_out"] = teacher_taps["attn_out"] if teacher_space else teacher_taps["attn_out"] @ self.p("o")
        if "ffn_out" in terms:
            targets["ffn_out"] = teacher_taps["ffn_out"] @ self.p("down")
        return out, {m: masked_mse(taps[m], targets[m], valid) for m in terms}

    def forward(self, h_t: Tensor, h_s: Tensor, ctx: Context, valid: Tensor | None = None,
                teacher_ctx: Context | None = None, aligned: tuple[Tensor, Tensor, Tensor] | None = None,
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Both layers; across tokenizers the teacher reads its own sequence (`teacher_ctx`) and the
        clone terms compare the `aligned` positions (`student_forward`)."""
        h_t_next, teacher_taps = self.teacher_forward(h_t, teacher_ctx or ctx)
        student_pairs = None
        if aligned is not None:  # keep the teacher's taps at the N pairs only, not at B * T_t positions
            rows, t_pos, s_pos = aligned
            teacher_taps = {m: pick(teacher_taps[m], rows, t_pos) for m in self.cfg.clone_terms}
            student_pairs = (rows, s_pos)
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Recompute only the student in backward; the teacher's taps are kept, never recomputed.
            h_s_next, clone = checkpoint(self.student_forward, h_s, teacher_taps, ctx, valid, student_pairs,
                                         use_reentrant=False)
        else:
            h_s_next, clone = self.student_forward(h_s, teacher_taps, ctx, valid, student_pairs)
        return h_t_next, h_s_next, clone


class LowRankClone(nn.Module):
    """Teacher and generated student side by side. Only projections and student norms train."""

    # A block reads its teacher weights directly (W_T @ P): ZeRO-3 must gather it as a whole.
    leaf_module_classes = (LowRankBlock,)

    def __init__(self, teacher: CausalLM, cfg: LRCConfig, vocab: StudentVocab | None = None):
        """`vocab`: the student's own vocabulary, across tokenizers (lrc_dist.vocab); None: the
        student inherits the teacher's."""
        super().__init__()
        args = teacher.args
        d_t, d_s = args.hidden_size, cfg.student_hidden_size
        if not 0 < d_s <= d_t:
            raise ValueError(f"lrc.student_hidden_size={d_s} must be in 1..{d_t} (the teacher's hidden_size).")
        self.cfg = cfg
        self.teacher_args = args
        self.hf_config = teacher.hf_config
        self.eps = args.rms_norm_eps if cfg.rms_norm_eps is None else cfg.rms_norm_eps
        self.vocab = vocab
        self.cross_tokenizer = vocab is not None
        if self.cross_tokenizer and cfg.head_logits == "project":
            raise ValueError("lrc.head_logits=project reads the teacher's head, which does not cover the student's "
                             "vocabulary across tokenizers: use auto or generate.")
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
        if vocab is not None:  # the student's rows in the teacher's space (lrc_dist.vocab), frozen
            self.vocab_embed = freeze(nn.Embedding.from_pretrained(vocab.embedding_rows(self.teacher_embed.weight)))
            if not args.tie_word_embeddings:
                self.vocab_head = nn.Parameter(vocab.head_rows(self.teacher_lm_head.weight), requires_grad=False)
            # the shared vocabulary's rows of each head, for the KD terms; derived, never checkpointed
            self.register_buffer("teacher_vocab", vocab.teacher_ids, persistent=False)
            self.register_buffer("student_vocab", vocab.student_ids, persistent=False)
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
        if self.cross_tokenizer and eos_id is not None:
            raise ValueError("data.document_mask is not supported across tokenizers yet: set it to false.")
        self.document_eos = eos_id

    def enable_dual_space(self) -> None:
        """Add the DSKD projector (loss.dskd_weight), ideally initialised from the two (KD) heads: call
        after `init_weights`, whose projections define the student head."""
        with torch.no_grad():
            w_s, w_t = self.kd_heads(self.student_head_weight())
            w_s = w_s.float()
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

    def embedding_rows(self) -> Tensor:
        """The rows the student's embedding is generated from: the teacher's embedding, or across
        tokenizers the student vocabulary's rows in the teacher's space (lrc_dist.vocab)."""
        return self.vocab_embed.weight if self.cross_tokenizer else self.teacher_embed.weight

    def head_rows(self) -> Tensor:
        """The rows the student's head is generated from (as `embedding_rows`)."""
        if self.teacher_args.tie_word_embeddings:
            return self.embedding_rows()
        return self.vocab_head if self.cross_tokenizer else self.teacher_lm_head.weight

    def student_head_weight(self, matmul: Matmul = torch.matmul) -> Tensor:
        if self.dense:
            head = self.embed_dense if self.teacher_args.tie_word_embeddings else self.lm_head_dense
            return head.to(self.teacher_embed.weight.dtype)
        rows = self.head_rows()
        return matmul(rows, self.head_projection().to(rows.dtype))

    def head_projection(self) -> Tensor:
        """The P of the student's head: the embedding's for a tied head, else the head's own."""
        return self.embed_proj if self.teacher_args.tie_word_embeddings else self.lm_head_proj

    def projects_head(self, tokens_per_forward: int) -> bool:
        """Whether training reads the student's logits as (h_S P^T) @ W_T^T (lrc.head_logits): never
        across tokenizers, with the DSKD projector or in the dense phase; under auto when it costs
        fewer FLOPs than generating the head for this many tokens per forward (the same on every
        rank: micro-batches have one shape)."""
        if self.dense or self.cross_tokenizer or self.dual_space is not None:
            return False
        return projects_head(self.cfg.head_logits, self.teacher_args.vocab_size, self.teacher_args.hidden_size,
                             self.cfg.student_hidden_size, tokens_per_forward * self.generation_ranks)

    def kd_heads(self, student_head: Tensor) -> tuple[Tensor, Tensor]:
        """(student, teacher) head weights the KD terms compare: across tokenizers restricted to the
        shared vocabulary (index_selects, so gradients reach the student's head)."""
        teacher_head = self.teacher_head_weight()
        if self.cross_tokenizer:
            return student_head.index_select(0, self.student_vocab), teacher_head.index_select(0, self.teacher_vocab)
        return student_head, teacher_head

    def forward(
        self, input_ids: Tensor, labels: Tensor, loss_cfg: LossConfig, normalizer: float | None = None,
        lm_labels: Tensor | None = None, **aligned: Tensor | float,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The training step's forward: lockstep pass and loss (see `lrc_loss`); `lm_labels`: the LM
        term's labels where they are not `labels` (on-policy windows, lrc_dist.on_policy). Across
        tokenizers `aligned` holds `TeacherRetokenizer`'s teacher_input_ids, align_* and clone_*
        tensors, and the step's global counts of their pairs, aligned_normalizer and clone_normalizer.

        The loss is computed here, inside the root module's forward, because FSDP2 and ZeRO-3 only
        gather the vocabulary-sized head weights while that forward runs.
        """
        if aligned and not self.cross_tokenizer:
            raise TypeError(f"aligned inputs {sorted(aligned)} given to an LRC model of one vocabulary.")
        if not self.cross_tokenizer:
            return lrc_loss(self, self.lockstep(input_ids, labels != IGNORE_INDEX), labels, loss_cfg, normalizer,
                            lm_labels)
        needed = ("teacher_input_ids", "clone_teacher", "clone_student", "clone_mask")
        if any(aligned.get(k) is None for k in needed):
            raise ValueError(f"this LRC model distills across tokenizers: forward needs {', '.join(needed)} and the "
                             f"align_* tensors (align.TeacherRetokenizer).")
        rows, pairs = aligned["clone_mask"].nonzero(as_tuple=True)
        positions = (rows, aligned["clone_teacher"][rows, pairs], aligned["clone_student"][rows, pairs])
        out = self.lockstep(input_ids, teacher_input_ids=aligned["teacher_input_ids"], aligned=positions)
        return lrc_loss(self, out, labels, loss_cfg, normalizer, lm_labels, aligned)

    def lockstep(self, input_ids: Tensor, valid: Tensor | None = None, teacher_input_ids: Tensor | None = None,
                 aligned: tuple[Tensor, Tensor, Tensor] | None = None) -> LRCOutput:
        """Teacher and student side by side through all layers; no loss. Across tokenizers the
        teacher reads `teacher_input_ids` and the clone terms compare the `aligned` positions
        (rows, teacher positions, student positions)."""
        with torch.no_grad():
            e = self.teacher_embed(input_ids if teacher_input_ids is None else teacher_input_ids)
        if self.dense:
            h_s = F.embedding(input_ids, self.embed_dense).to(e.dtype)
        else:  # gather rows first: (tokens x d_T) @ P instead of materialising the (vocab x d_S) embedding
            with torch.no_grad():
                rows = e if teacher_input_ids is None else self.vocab_embed(input_ids)
            h_s = rows @ self.embed_proj.to(e.dtype)
        # A scaled embedding (Gemma: sqrt(width)) scales each model by its own width, as its export does.
        h_t, h_s = self.teacher_args.scale_embeddings(e), self.student_args().scale_embeddings(h_s)
        ctx = Context.of(self.rotary, self.teacher_args, input_ids, h_s.dtype, self.document_eos)
        teacher_ctx = None if teacher_input_ids is None else Context.of(self.rotary, self.teacher_args,
                                                                        teacher_input_ids, h_s.dtype)
        clone: dict[str, Tensor] = {}
        for block in self.layers:
            h_t, h_s, terms = block(h_t, h_s, ctx, valid, teacher_ctx, aligned)
            for name, value in terms.items():
                clone[name] = clone[name] + value if name in clone else value
        with torch.no_grad():
            h_t = self.teacher_norm(h_t)
        return LRCOutput(h_t, self.norm(h_s), clone)

    # ---- what the trainer and the backends use ---------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The vocabulary of the input tokens: the student's."""
        return self.vocab.size if self.cross_tokenizer else self.teacher_args.vocab_size

    def flops_per_token(self, seq_len: int, tokens_per_forward: int) -> float:
        """Model FLOPs of one trained token on one device (metrics.lrc_flops_per_token)."""
        dense = (self.cfg.dense_projections, self.layers[0].kept_projections()) if self.dense else None
        return lrc_flops_per_token(self.teacher_args, self.cfg.student_hidden_size, seq_len, tokens_per_forward,
                                   self.generation_ranks, dense, self.vocab_size,
                                   self.projects_head(tokens_per_forward))

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for block in self.layers:
            block.activation_checkpointing = enabled

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)

    def external_params(self) -> list[Tensor]:
        """Weights the root forward reads outside their module's own forward."""
        dual_space = [self.dual_space.t2s] if self.dual_space is not None else []
        rows = [self.vocab_embed.weight, self.head_rows()] if self.cross_tokenizer else []
        return [self.teacher_embed.weight, self.teacher_head_weight(), *rows, *dual_space]

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
        yield [self._rows_name("embed"), "embed_proj", "norm.weight"], lambda: {
            "embed_dense": self.embedding_rows() @ self.embed_proj.to(self.embedding_rows().dtype),
            "norm.weight": self.norm.weight}
        for i, block in enumerate(self.layers):
            yield [n for n, _ in block.named_parameters(prefix=f"layers.{i}")], functools.partial(
                lambda i, block: {f"layers.{i}.{k}": v for k, v in block.dense_state().items()}, i, block)
        if not self.teacher_args.tie_word_embeddings:
            yield [self._rows_name("head"), "lm_head_proj"], lambda: {"lm_head_dense": self.student_head_weight()}
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
        vocab, d_s = self.vocab_size, self.cfg.student_hidden_size
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

    def _rows_name(self, kind: str) -> str:
        """The parameter the student's embedding ("embed") or head ("head") is generated from."""
        if kind == "head" and not self.teacher_args.tie_word_embeddings:
            return "vocab_head" if self.cross_tokenizer else "teacher_lm_head.weight"
        return "vocab_embed.weight" if self.cross_tokenizer else "teacher_embed.weight"

    def student_args(self) -> ModelArgs:
        return replace(self.teacher_args, hidden_size=self.cfg.student_hidden_size, rms_norm_eps=self.eps,
                       vocab_size=self.vocab_size)

    def student_hf_config(self) -> PretrainedConfig:
        a = self.student_args()
        config = resized_config(self.hf_config, a.hidden_size, a.head_dim, a.rms_norm_eps, a.tie_word_embeddings)
        if self.cross_tokenizer:  # the student's vocabulary and special tokens
            config.vocab_size, config.pad_token_id = a.vocab_size, None
            config.eos_token_id, config.bos_token_id = self.vocab.eos_id, self.vocab.bos_id
        return config

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
            w = self.embedding_rows()
            return {"model.embed_tokens.weight": w @ self.embed_proj.to(w.dtype), "model.norm.weight": self.norm.weight}

        def layer(i: int) -> dict[str, Tensor]:
            return {f"model.layers.{i}.{hf}": t for hf, t in fuse_layer(student, self.layers[i].student_weights()).items()}

        head = ["lm_head_dense"] if self.dense else [self._rows_name("head"), "lm_head_proj"]
        yield (["embed_dense", "norm.weight"] if self.dense else [self._rows_name("embed"), "embed_proj", "norm.weight"]
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
    lm_labels: Tensor | None = None, aligned: dict[str, Tensor | float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total LRC loss and its detached terms for logging.

    With a global `normalizer` (labelled tokens of the whole step, all ranks and micro-batches), the
    per-micro-batch clone MSE is weighted by this micro-batch's share of those tokens, so that
    summing losses (and gradients) over micro-batches and ranks gives the step's token mean. Across
    tokenizers (`aligned`: `LowRankClone.forward`'s) the head terms are `aligned_logit_losses` and
    the clone MSE, a mean over this micro-batch's compared positions, is weighted by its share of
    the step's (clone_normalizer).
    """
    if aligned is None:
        local = (labels != IGNORE_INDEX).sum()
        share = 1.0 if normalizer is None else local / normalizer
        h_s, w_t = out.student_hidden.flatten(0, 1), model.teacher_head_weight()
        if model.projects_head(labels.numel()):  # h_S (W_T P)^T = (h_S P^T) W_T^T: no head generated
            h_s, w_s = h_s @ model.head_projection().T.to(h_s.dtype), w_t
        else:
            w_s = model.student_head_weight(model.generation_matmul)
        head, metrics = logit_losses(
            h_s, w_s, out.teacher_hidden.flatten(0, 1), w_t, labels.flatten(), cfg, normalizer, model.dual_space,
            lm_labels.flatten() if lm_labels is not None else None,
        )
    else:
        w_s = model.student_head_weight(model.generation_matmul)
        total = aligned.get("clone_normalizer")
        share = 1.0 if total is None else aligned["clone_mask"].sum() / max(total, 1)
        w_s_shared, w_t_shared = model.kd_heads(w_s)
        h_t = out.teacher_hidden if cfg.kl_weight or cfg.dskd_weight else None  # no KD term: no KD pass
        head, metrics = aligned_logit_losses(out.student_hidden, w_s, w_s_shared, h_t, w_t_shared,
                                             labels, cfg, normalizer, model.dual_space, lm_labels, aligned)
    weights = model.cfg.clone_term_weights
    clone = share * sum(weights.get(name, 1.0) * value for name, value in out.clone.items())
    total = head + cfg.clone_weight * clone
    metrics.update(loss=total, clone=clone)
    metrics.update({f"clone/{name}": share * value for name, value in out.clone.items()})
    return total, {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

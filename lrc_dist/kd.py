"""The baselines beside LRC: an ordinary student trained by logit KD, or by the LM loss alone.

`KnowledgeDistillation` holds a student `CausalLM` whose every weight trains (randomly initialised
unless its checkpoint has weights) and, optionally, a frozen teacher. Its loss is the LRC loss
without the clone terms: lm_weight * LM + kl_weight * D(teacher || student) (losses.py). With no
teacher it is plain language-model pre-training, which the CPU demo uses to make its teacher.
It exposes the same small interface as `LowRankClone`, so the trainer, the backends and the
export treat both alike.

Across tokenizers (a teacher whose vocabulary differs; `vocab_overlap` given): the student's LM
loss is on its own tokens and full head as usual, while the teacher reads the same text in its
own tokens (`align.TeacherRetokenizer`) and the KD terms (KL and/or DSKD) compare only aligned
positions, where both models have read the same text and predict the same token, with both heads
restricted to the tokens the vocabularies share. They are means over the aligned pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from lrc_dist.dskd import DualSpaceProjector
from lrc_dist.interface import ExtraPart, StudentPart
from lrc_dist.losses import LossConfig, aligned_logit_losses, logit_losses
from lrc_dist.metrics import kd_flops_per_token
from lrc_dist.families import ModelArgs
from lrc_dist.model import CausalLM, DecoderLayer, load_config, resized_config


@torch.no_grad()
def init_causal_lm_(model: CausalLM, seed: int, std: float = 0.02) -> CausalLM:
    """Matrices and embeddings ~ N(0, std), norms scaling by 1, biases 0 (the HF init). Deterministic."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(model.args.family.norm_init)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.copy_(torch.randn(param.shape, generator=g) * std)
    return model


def build_student(path: str, seed: int) -> CausalLM:
    """The student in checkpoint dir `path`: its weights when it has any weight file, else a
    random init. Weight files that can't be used (missing shards, .bin only) are errors."""
    if any(Path(path).glob("model*.safetensors*")) or any(Path(path).glob("*.bin")):
        return CausalLM.from_pretrained(path, dtype=torch.float32)
    config = load_config(path)  # config only: a fresh student of that shape
    student = CausalLM(ModelArgs.from_hf(config, str(Path(path) / "config.json")), config)
    return init_causal_lm_(student.float(), seed)


def student_like(teacher: CausalLM, hidden_size: int, seed: int) -> CausalLM:
    """A random student of the LRC student's shape: the teacher's at width `hidden_size`."""
    a = teacher.args
    config = resized_config(teacher.hf_config, hidden_size, a.head_dim, a.rms_norm_eps, a.tie_word_embeddings)
    return init_causal_lm_(CausalLM(ModelArgs.from_hf(config), config), seed)


class KnowledgeDistillation(nn.Module):
    """A trainable student and an optional frozen teacher; the loss is LM + D(teacher || student)."""

    leaf_module_classes = (DecoderLayer,)  # layers read their weights directly: ZeRO-3 gathers them whole

    def __init__(self, student: CausalLM, teacher: CausalLM | None = None,
                 vocab_overlap: tuple[Tensor, Tensor] | None = None):
        """`vocab_overlap`: (teacher_ids, student_ids) of `align.vocab_overlap` for a teacher with
        another tokenizer; forward then needs the aligned inputs (see `forward`)."""
        super().__init__()
        if teacher is not None and vocab_overlap is None and teacher.args.vocab_size != student.args.vocab_size:
            raise ValueError(f"the student's vocabulary ({student.args.vocab_size}) differs from the teacher's "
                             f"({teacher.args.vocab_size}); logit KD needs one vocabulary, or a student checkpoint "
                             "dir with its own tokenizer.json for distillation across tokenizers.")
        if vocab_overlap is not None and teacher is None:
            raise ValueError("a vocabulary overlap needs a teacher (model.method kd).")
        self.student = student.float()  # fp32 masters; FSDP/DeepSpeed cast for compute
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self.cross_tokenizer = vocab_overlap is not None
        # The shared vocabulary's rows of each head; derived from the tokenizers, never checkpointed.
        teacher_ids, student_ids = vocab_overlap if vocab_overlap is not None else (None, None)
        self.register_buffer("teacher_vocab", teacher_ids, persistent=False)
        self.register_buffer("student_vocab", student_ids, persistent=False)
        self.activation_checkpointing = False
        self.dual_space: DualSpaceProjector | None = None
        self.dense = False  # no dense phase: the student is dense throughout

    def kd_heads(self) -> tuple[Tensor, Tensor]:
        """(student, teacher) head weights the KD terms compare: restricted to the shared
        vocabulary across tokenizers (index_selects of the registered heads, so gradients reach
        the student's)."""
        w_s, w_t = self.student.lm_head_weight, self.teacher.lm_head_weight
        if self.cross_tokenizer:
            return w_s.index_select(0, self.student_vocab), w_t.index_select(0, self.teacher_vocab)
        return w_s, w_t

    def set_document_mask(self, eos_id: int | None) -> None:
        """Attention and RoPE positions per document of a packed window (documents end with
        `eos_id`), for student and teacher alike; None: the whole window is one sequence."""
        if self.cross_tokenizer and eos_id is not None:
            raise ValueError("data.document_mask is not supported across tokenizers yet: set it to false.")
        for model in (self.student, self.teacher):
            if model is not None:
                model.document_eos = eos_id

    def enable_dual_space(self) -> None:
        """Add the DSKD projector (loss.dskd_weight), ideally initialised from the two (KD) heads."""
        if self.teacher is None:
            raise ValueError("DSKD needs a teacher (model.method kd, not lm).")
        w_s, w_t = self.kd_heads()
        self.dual_space = DualSpaceProjector(w_t.shape[1], w_s.shape[1]).ideal_init_(w_t, w_s.detach())

    # ---- what the trainer and the backends use ---------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The vocabulary of the input tokens: the student's."""
        return self.student.args.vocab_size

    def flops_per_token(self, seq_len: int, tokens_per_forward: int) -> float:
        """Student forward and backward, plus the teacher's forward (metrics.kd_flops_per_token)."""
        return kd_flops_per_token(self.student.args, self.teacher.args if self.teacher is not None else None, seq_len)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    def set_generation_matmul(self, matmul, ranks: int = 1) -> None:
        raise ValueError("parallel.shard_generation applies to LRC only: a KD student has weights of its own.")

    def shard_units(self) -> list[nn.Module]:
        teacher_layers = list(self.teacher.model.layers) if self.teacher is not None else []
        return list(self.student.model.layers) + teacher_layers

    def external_params(self) -> list[Tensor]:
        """Weights the root forward reads outside their module's own forward (the heads)."""
        heads = [self.student.lm_head_weight]
        heads += [self.teacher.lm_head_weight] if self.teacher is not None else []
        return heads + ([self.dual_space.t2s] if self.dual_space is not None else [])

    def dense_parts(self) -> Iterator[StudentPart]:
        raise ValueError("model.lrc.dense_after is LRC's dense phase; a KD student is dense throughout.")

    def param_group(self, name: str) -> tuple[str, float]:
        """(optimizer group, learning-rate scale): the DSKD projector's own; 1 for the student."""
        return ("dual_space", self.dual_space.lr_scale) if name.startswith("dual_space.") else ("base", 1.0)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, input_ids: Tensor, labels: Tensor, loss_cfg: LossConfig, normalizer: float | None = None,
                lm_labels: Tensor | None = None, **aligned: Tensor | float) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached metrics). Across tokenizers `aligned` holds `TeacherRetokenizer`'s
        teacher_input_ids, align_student, align_teacher, align_mask and `aligned_normalizer`, the
        step's global count of aligned pairs (default: this micro-batch's). `lm_labels`: the LM
        term's labels where they are not `labels` (on-policy windows, lrc_dist.on_policy)."""
        if aligned and not self.cross_tokenizer:
            raise TypeError(f"aligned inputs {sorted(aligned)} given to a KD model of one vocabulary.")
        h_s = self.student_hidden(input_ids)
        use_teacher = self.teacher is not None and bool(loss_cfg.kl_weight or loss_cfg.dskd_weight)
        if self.cross_tokenizer:
            return self._cross_tokenizer_losses(h_s, labels, loss_cfg, normalizer, use_teacher, lm_labels, **aligned)
        h_t = w_t = None
        if use_teacher:
            with torch.no_grad():
                h_t, w_t = self.teacher.hidden_states(input_ids).flatten(0, 1), self.teacher.lm_head_weight
        total, metrics = logit_losses(h_s.flatten(0, 1), self.student.lm_head_weight, h_t, w_t, labels.flatten(),
                                      loss_cfg, normalizer, self.dual_space,
                                      lm_labels.flatten() if lm_labels is not None else None)
        return total, {"loss": total.detach(), **metrics}

    def _cross_tokenizer_losses(self, h_s: Tensor, labels: Tensor, loss_cfg: LossConfig, normalizer: float | None,
                                use_teacher: bool, lm_labels: Tensor | None, teacher_input_ids: Tensor | None = None,
                                **aligned: Tensor | float) -> tuple[Tensor, dict[str, Tensor]]:
        """LM on the student's own tokens and full head; KD terms on the aligned pairs only."""
        h_t = None
        if use_teacher:
            if teacher_input_ids is None:
                raise ValueError("this KD model distills across tokenizers: forward needs teacher_input_ids, "
                                 "align_student, align_teacher and align_mask (align.TeacherRetokenizer).")
            with torch.no_grad():
                h_t = self.teacher.hidden_states(teacher_input_ids)
        w_s_shared, w_t_shared = self.kd_heads()
        total, metrics = aligned_logit_losses(h_s, self.student.lm_head_weight, w_s_shared, h_t, w_t_shared, labels,
                                              loss_cfg, normalizer, self.dual_space, lm_labels, aligned)
        return total, {"loss": total.detach(), **metrics}

    def student_hidden(self, input_ids: Tensor) -> Tensor:
        return self.student.hidden_states(input_ids, checkpoint_layers=self.activation_checkpointing)

    # ---- export ----------------------------------------------------------------------------------

    def student_hf_config(self) -> PretrainedConfig:
        return self.student.hf_config

    @torch.no_grad()
    def student_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous() for k, v in self.student.state_dict().items()}

    # ---- export part by part (interface.DistillationModel) ----------------------------------------

    def student_parts(self) -> Iterator[StudentPart]:
        """`student_state_dict`, in its order, as parts an export can gather one at a time: the
        embedding, each layer, the final norm with the head. The teacher is no part of it."""

        def part(*modules: tuple[str, nn.Module]) -> StudentPart:
            def tensors() -> dict[str, Tensor]:
                return {n: p for prefix, m in modules for n, p in m.named_parameters(prefix=prefix)}

            return [f"student.{n}" for n in tensors()], tensors

        s = self.student
        yield part(("model.embed_tokens", s.model.embed_tokens))
        for i, layer in enumerate(s.model.layers):
            yield part((f"model.layers.{i}", layer))
        yield part(("model.norm", s.model.norm), *([] if s.args.tie_word_embeddings else [("lm_head", s.lm_head)]))

    def export_extras(self) -> list[ExtraPart]:
        """A KD export is the HF student alone."""
        return []

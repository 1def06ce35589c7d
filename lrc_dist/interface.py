"""What the trainer, the backends and the export ask of a distillation model.

`LowRankClone` (lrc.py) and `KnowledgeDistillation` (kd.py) are torch modules with these members;
build.py builds one of them from the config, and no other module names their classes. Beyond
these members the callers use only what every `nn.Module` has: calling it (`forward`),
`parameters`, `named_parameters`, `to`, `load_state_dict`, and the backends' wrapping
(`fully_shard`, `deepspeed.initialize`). This module imports nothing of lrc_dist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor, nn
from transformers import PretrainedConfig

if TYPE_CHECKING:
    from lrc_dist.losses import LossConfig

# x @ p: torch.matmul, or parallel.sharded_matmul, which shares the rows out between ranks.
Matmul = Callable[[Tensor, Tensor], Tensor]

# One part of an export: the names (as in `named_parameters`) of the parameters it reads, and a
# function of the model's current parameters: one returning the part's Hugging Face tensors
# (StudentPart), or one writing method-specific files into the export dir, given the teacher dir
# (ExtraPart). The export gathers the named parameters at their full value first, so that a
# sharded model is materialised one part at a time.
StudentPart = tuple[list[str], Callable[[], dict[str, Tensor]]]
ExtraPart = tuple[list[str], Callable[[Path, str], None]]


@runtime_checkable
class DistillationModel(Protocol):
    """A distillation model as the trainer (train.py), the backends (parallel.py) and the export
    (export.py) use it. Implementations are `nn.Module`s."""

    leaf_module_classes: tuple[type[nn.Module], ...]
    """modules ZeRO-3 must gather whole: their forward reads the weights of child modules directly"""
    cross_tokenizer: bool
    """the teacher reads the text in its own tokens: batches carry the aligned positions
    (align.TeacherRetokenizer) and `forward` takes them as keyword arguments"""
    dual_space: nn.Module | None
    """the DSKD projector once `enable_dual_space` added it; its `lr_scale` scales its learning rate"""
    dense: bool
    """LRC in its dense phase (`lrc.dense_after`: free student matrices); False for other methods"""

    @property
    def vocab_size(self) -> int:
        """The vocabulary of the input tokens (what the token sets must fit)."""

    def forward(self, input_ids: Tensor, labels: Tensor, loss_cfg: LossConfig, normalizer: float | None = None,
                lm_labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(the loss, divided by `normalizer` (the step's labelled tokens), detached metrics);
        `lm_labels`: the LM term's labels where they are not `labels` (the windows the student
        continued, `loss.on_policy_ratio`, lrc_dist.on_policy)."""

    def flops_per_token(self, seq_len: int, tokens_per_forward: int) -> float:
        """Model FLOPs of one trained token on one device (for the MFU)."""

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward instead of keeping them."""

    def set_generation_matmul(self, matmul: Matmul, ranks: int = 1) -> None:
        """How the forward generates student weights, `ranks` devices sharing the work
        (`parallel.shard_generation`); a ValueError where the method generates none."""

    def set_document_mask(self, eos_id: int | None) -> None:
        """Attention and RoPE positions per document of a packed window (`data.document_mask`);
        a ValueError where the method cannot."""

    def enable_dual_space(self) -> None:
        """Add the DSKD projector (`loss.dskd_weight`)."""

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (the root takes the rest)."""

    def external_params(self) -> list[Tensor]:
        """Weights the root forward reads outside their own module's forward (ZeRO-3 must fetch them)."""

    def param_group(self, name: str) -> tuple[str, float]:
        """(optimizer group, learning rate as a multiple of the schedule's) of parameter `name`."""

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained tensors, by parameter name: what checkpoints hold and exports start from."""

    def student_hf_config(self) -> PretrainedConfig:
        """The Hugging Face config of the exported student."""

    def student_parts(self) -> Iterator[StudentPart]:
        """The student's Hugging Face tensors part by part (a layer, the embedding, the head), in
        the order an export writes them."""

    def dense_parts(self) -> Iterator[StudentPart]:
        """The tensors of the dense phase computed from the current model, part by part as
        `student_parts` (the trainer gathers and loads them at the switch); a ValueError where
        the method has no dense phase."""

    def export_extras(self) -> list[ExtraPart]:
        """What an export writes beside the HF student: (parameters, a writer taking the export
        directory and the teacher directory) for each; none for most methods."""

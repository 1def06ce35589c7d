"""The LRC student's config (`model.lrc`): its width, the activation clone terms, the projection
init and the dense phase; lrc.py builds the model it describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

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
    head_logits: Literal["auto", "generate", "project"] = "auto"
    """how training computes the student's logits, the same up to rounding either way: generate,
    h_S @ (W_T P)^T, the head W_T P generated per forward (and its gradient for P); project,
    (h_S P^T) @ W_T^T, the final states projected to the teacher's width and read by the teacher's
    head (no vocabulary-sized generation; the logits' matmuls at width d_T); auto: whichever has
    fewer FLOPs at the forward's tokens (metrics.head_flops_per_token). Across tokenizers, with
    loss.dskd_weight and in the dense phase the student's own head is used (generate)"""
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
        if self.head_logits not in ("auto", "generate", "project"):
            raise ValueError(f"lrc.head_logits={self.head_logits!r}; use auto, generate or project.")
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

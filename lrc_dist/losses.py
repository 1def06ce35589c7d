"""LRC training loss: L = w_lm * LM + w_kl * KL(teacher || student) + alpha * sum_terms w_t * clone_t.

The LM and KL terms need the logits of both models, [tokens x vocab] each: 2 x 16k x 152k fp32 is
20 GB for one Qwen micro-batch. `head_losses` never holds them: it walks the tokens in chunks,
computes both losses in fp32 and, in the same pass, the gradient with respect to the student's
hidden states and head weight (the fused linear-cross-entropy approach of Liger-Kernel). Backward
then only scales the stored gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lrc_dist.lrc import LowRankClone

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB fp32 each for student and teacher)


@dataclass
class LossConfig:
    lm_weight: float = 1.0
    kl_weight: float = 1.0
    clone_weight: float = 0.5  # alpha; the paper uses 0.2 (1.5B) or 0.5 (1.7B, 4B)
    temperature: float = 40.0  # softmax temperature of the KL term (paper: 40)
    chunk_tokens: int | None = None  # tokens per chunk of the head losses; None: ~CHUNK_ELEMENTS logits


@dataclass
class LRCOutput:
    teacher_hidden: Tensor  # [B, T, d_T], final-normed, no grad
    student_hidden: Tensor  # [B, T, d_S], final-normed
    clone: dict[str, Tensor]  # per clone term, the MSE summed over layers


class _HeadLosses(torch.autograd.Function):
    """(weighted LM + KL, LM, KL) from hidden states and head weights, chunked over tokens."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, temperature, lm_weight, kl_weight, normalizer, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if need_w else None
        lm_sum = h_s.new_zeros((), dtype=torch.float32)
        kl_sum = lm_sum.clone()
        use_kl = kl_weight != 0.0 and h_t is not None
        for start in range(0, h_s.shape[0], chunk):
            hs = h_s[start : start + chunk]
            y = labels[start : start + chunk]
            valid = (y != IGNORE_INDEX).unsqueeze(1).float()
            z = (hs @ w_s.T).float()
            logp = torch.log_softmax(z, dim=-1)
            lm_sum += -(logp.gather(1, y.clamp(min=0).unsqueeze(1)) * valid).sum()
            # d(CE)/dz = softmax(z) - onehot(y)
            dz = logp.exp_().mul_(lm_weight)
            dz.scatter_add_(1, y.clamp(min=0).unsqueeze(1), torch.full_like(valid, -lm_weight))
            if use_kl:
                logq_s = torch.log_softmax(z.div_(temperature), dim=-1)
                logq_t = torch.log_softmax((h_t[start : start + chunk] @ w_t.T).float().div_(temperature), dim=-1)
                q_t = logq_t.exp()
                kl_sum += ((q_t * (logq_t - logq_s)).sum(1, keepdim=True) * valid).sum()
                # d KL(q_t || softmax(z / T)) / dz = (softmax(z / T) - q_t) / T
                dz += logq_s.exp_().sub_(q_t).mul_(kl_weight / temperature)
            dz.mul_(valid / normalizer)
            if need_h:
                grad_h[start : start + chunk] = (dz.to(w_s.dtype) @ w_s).to(h_s.dtype)
            if need_w:  # matmul in the input dtype (tensor cores), accumulation over chunks in fp32
                grad_w += dz.T.to(hs.dtype) @ hs
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        lm, kl = lm_sum / normalizer, kl_sum / normalizer
        total = lm_weight * lm + kl_weight * kl
        ctx.mark_non_differentiable(lm, kl)
        return total, lm, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_lm, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_total).to(ctx.w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def head_losses(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor | None,
    w_t: Tensor | None,
    labels: Tensor,
    cfg: LossConfig,
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LM cross-entropy and KL(teacher || student) at temperature T, means over labelled tokens.

    h_s [N, d_S] and w_s [V, d_S] give the student logits, h_t [N, d_T] and w_t [V, d_T] the
    teacher's (None: no KL). `normalizer` replaces the local labelled-token count, e.g. by the
    global count of a gradient-accumulated, data-parallel batch. Returns (lm_weight * LM +
    kl_weight * KL, LM, KL); only the first carries gradients.
    """
    if normalizer is None:
        normalizer = max(int((labels != IGNORE_INDEX).sum()), 1)
    chunk = cfg.chunk_tokens or max(1, CHUNK_ELEMENTS // w_s.shape[0])
    kl_weight = cfg.kl_weight if h_t is not None else 0.0
    return _HeadLosses.apply(h_s, w_s, h_t, w_t, labels, cfg.temperature, cfg.lm_weight, kl_weight, float(normalizer), chunk)


def lrc_loss(
    model: "LowRankClone", out: LRCOutput, labels: Tensor, cfg: LossConfig, normalizer: float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total LRC loss and its detached terms for logging.

    With a global `normalizer` (labelled tokens of the whole step, all ranks and micro-batches), the
    per-micro-batch clone MSE is weighted by this micro-batch's share of those tokens, so that
    summing losses (and gradients) over micro-batches and ranks gives the step's token mean.
    """
    local = (labels != IGNORE_INDEX).sum()
    share = 1.0 if normalizer is None else local / normalizer
    head, lm, kl = head_losses(
        out.student_hidden.flatten(0, 1), model.student_head_weight(),
        out.teacher_hidden.flatten(0, 1), model.teacher_head_weight(),
        labels.flatten(), cfg, normalizer,
    )
    weights = model.cfg.clone_term_weights
    clone = share * sum(weights.get(name, 1.0) * value for name, value in out.clone.items())
    total = head + cfg.clone_weight * clone
    metrics = {"loss": total, "lm": lm, "kl": kl, "clone": clone}
    metrics.update({f"clone/{name}": share * value for name, value in out.clone.items()})
    return total, {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

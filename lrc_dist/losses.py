"""LRC training loss: L = w_lm * LM + w_kl * D(teacher || student) + alpha * sum_terms w_t * clone_t
(+ w_dskd * the dual-space objective of dskd.py, when set).

D is forward KL in the LRC paper; any divergence of `DIVERGENCES` can replace it
(`loss.divergence`); its value is logged as "kl" whichever it is.

The LM and KL terms need the logits of both models, [tokens x vocab] each: 2 x 16k x 152k fp32 is
20 GB for one Qwen micro-batch. `head_losses` never holds them: it walks the tokens in chunks,
computes both terms in fp32 and, in the same pass, the gradient with respect to the student's
hidden states and head weight (the fused linear-cross-entropy approach of Liger-Kernel). Backward
then only scales the stored gradients.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lrc_dist.dskd import DualSpaceProjector
    from lrc_dist.lrc import LowRankClone

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB fp32 each for student and teacher)


# The logit divergences D(teacher || student) of DIVERGENCES, by name.
Divergence = Literal["forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "adaptive_kl", "tvd"]


@dataclass
class LossConfig:
    """Loss terms: lm_weight * LM + kl_weight * D(teacher || student) + clone_weight * clone terms
    (+ dskd_weight * DSKD); every term is a mean over labelled tokens."""

    lm_weight: float = 1.0
    """weight of the student's next-token cross-entropy"""
    kl_weight: float = 1.0
    """weight of the logit divergence (the recipes use seq_len: the paper sums the KL over positions)"""
    clone_weight: float = 0.5
    """alpha, the weight of the activation clone terms; the paper uses 0.2 (1.5B) or 0.5 (1.7B, 4B)"""
    temperature: float = 40.0
    """softmax temperature of the logit divergence (paper: 40)"""
    divergence: Divergence = "forward_kl"
    """the logit term D(teacher || student); forward_kl is the paper's"""
    skew: float = 0.1
    """lambda of the skewed KL divergences"""
    chunk_tokens: int | None = None
    """tokens per chunk of the head losses; null: about 2^25 logits per chunk"""
    dskd_weight: float = 0.0
    """weight of the dual-space KD loss (lrc_dist.dskd); 0 disables it"""
    dskd_temperature: float = 2.0
    """softmax temperature of the DSKD divergences (no T^2 factor)"""
    dskd_divergence: Divergence = "forward_kl"
    """D of both DSKD spaces"""
    dskd_mask: bool = True
    """student-space KD only where the projected teacher keeps the teacher's argmax"""


@dataclass
class LRCOutput:
    teacher_hidden: Tensor  # [B, T, d_T], final-normed, no grad
    student_hidden: Tensor  # [B, T, d_S], final-normed
    clone: dict[str, Tensor]  # per clone term, the MSE summed over layers


# ---- logit divergences D(teacher p || student q), per token, from temperature-scaled log-probs ----


def forward_kl(logq: Tensor, logp: Tensor) -> Tensor:
    """KL(p || q) = sum p (log p - log q): mass-covering; the KL of the LRC paper."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reverse_kl(logq: Tensor, logp: Tensor) -> Tensor:
    """KL(q || p): mode-seeking."""
    return forward_kl(logp, logq)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stably."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def js_divergence(logq: Tensor, logp: Tensor) -> Tensor:
    """(KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2."""
    logm = _log_mix(logp, logq, 0.5)
    return 0.5 * (forward_kl(logm, logp) + forward_kl(logm, logq))


def skewed_forward_kl(logq: Tensor, logp: Tensor, skew: float = 0.1) -> Tensor:
    """KL(p || skew p + (1 - skew) q) (DistiLLM)."""
    return forward_kl(_log_mix(logp, logq, skew), logp)


def skewed_reverse_kl(logq: Tensor, logp: Tensor, skew: float = 0.1) -> Tensor:
    """KL(q || (1 - skew) p + skew q) (DistiLLM)."""
    return forward_kl(_log_mix(logq, logp, skew), logq)


def adaptive_kl(logq: Tensor, logp: Tensor, head_mass: float = 0.5) -> Tensor:
    """AKL: forward and reverse KL weighted by the student's gap on the teacher's head and tail.

    Sorting p ascending, the tail is the tokens whose cumulative teacher mass is <= head_mass;
    g = sum |p - q| over each part (no gradient); AKL = (g_head FKL + g_tail RKL) / (g_head + g_tail).
    """
    with torch.no_grad():
        p, q = logp.exp(), logq.exp()
        sorted_p, order = p.sort(dim=-1)
        tail = (sorted_p.cumsum(-1) <= head_mass).float()
        gap = (p - q).abs().gather(-1, order)
        g_tail = (gap * tail).sum(-1)
        g_head = (gap * (1.0 - tail)).sum(-1)
        w_head = g_head / (g_head + g_tail).clamp_min(1e-12)
    return w_head * forward_kl(logq, logp) + (1.0 - w_head) * reverse_kl(logq, logp)


def total_variation(logq: Tensor, logp: Tensor) -> Tensor:
    """TVD = sum |p - q| / 2."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": js_divergence,
    "skewed_forward_kl": skewed_forward_kl,
    "skewed_reverse_kl": skewed_reverse_kl,
    "adaptive_kl": adaptive_kl,
    "tvd": total_variation,
}


assert set(get_args(Divergence)) == set(DIVERGENCES), "loss.Divergence must name every divergence"


def divergence_fn(name: str, skew: float, field: str = "divergence"):
    """The divergence `name` of DIVERGENCES, with `skew` bound for the skewed ones; `field` names the
    config entry in the error."""
    if name not in DIVERGENCES:
        raise ValueError(f"loss.{field}={name!r}; choose from {', '.join(DIVERGENCES)}.")
    fn = DIVERGENCES[name]
    return functools.partial(fn, skew=skew) if name.startswith("skewed") else fn


class _HeadLosses(torch.autograd.Function):
    """(lm_weight * LM + kd_weight * D, LM, D) from hidden states and head weights, chunked over tokens.

    Each chunk's fp32 logits get a small autograd pass of their own: it yields d(loss)/d(logits),
    turned at once into the gradients of h_s and w_s, so that only one chunk of logits (and its
    softmax intermediates) is alive at a time, in forward and backward alike.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, divergence, temperature, lm_weight, kd_weight, normalizer, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if need_w else None
        lm_sum = h_s.new_zeros((), dtype=torch.float32)
        kd_sum = lm_sum.clone()
        use_kd = kd_weight != 0.0 and h_t is not None
        for start in range(0, h_s.shape[0], chunk):
            hs = h_s[start : start + chunk]
            y = labels[start : start + chunk]
            valid = (y != IGNORE_INDEX).float()
            z = (hs @ w_s.T).float().requires_grad_(True)
            with torch.enable_grad():
                logp = torch.log_softmax(z, dim=-1)
                lm = -(logp.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1) * valid).sum()
                loss = lm_weight * lm
                if use_kd:
                    logp_t = torch.log_softmax((h_t[start : start + chunk] @ w_t.T).float() / temperature, dim=-1)
                    kd = (divergence(torch.log_softmax(z / temperature, dim=-1), logp_t) * valid).sum()
                    loss = loss + kd_weight * kd
                    kd_sum += kd.detach()
                (dz,) = torch.autograd.grad(loss / normalizer, z)
            lm_sum += lm.detach()
            if need_h:
                grad_h[start : start + chunk] = (dz.to(w_s.dtype) @ w_s).to(h_s.dtype)
            if need_w:  # matmul in the input dtype (tensor cores), accumulation over chunks in fp32
                grad_w += dz.T.to(hs.dtype) @ hs
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        lm, kd = lm_sum / normalizer, kd_sum / normalizer
        total = lm_weight * lm + kd_weight * kd
        ctx.mark_non_differentiable(lm, kd)
        return total, lm, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_lm, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_total).to(ctx.w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def head_losses(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor | None,
    w_t: Tensor | None,
    labels: Tensor,
    cfg: LossConfig,
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LM cross-entropy and D(teacher || student) at temperature T (`cfg.divergence`, forward KL by
    default), means over labelled tokens.

    h_s [N, d_S] and w_s [V, d_S] give the student logits, h_t [N, d_T] and w_t [V, d_T] the
    teacher's (None: no KL). `normalizer` replaces the local labelled-token count, e.g. by the
    global count of a gradient-accumulated, data-parallel batch. Returns (lm_weight * LM +
    kl_weight * KL, LM, KL); only the first carries gradients.
    """
    if normalizer is None:
        normalizer = max(int((labels != IGNORE_INDEX).sum()), 1)
    chunk = cfg.chunk_tokens or max(1, CHUNK_ELEMENTS // w_s.shape[0])
    kl_weight = cfg.kl_weight if h_t is not None else 0.0
    divergence = divergence_fn(cfg.divergence, cfg.skew)
    return _HeadLosses.apply(h_s, w_s, h_t, w_t, labels, divergence, cfg.temperature, cfg.lm_weight,
                             kl_weight, float(normalizer), chunk)


def logit_losses(
    h_s: Tensor, w_s: Tensor, h_t: Tensor | None, w_t: Tensor | None, labels: Tensor, cfg: LossConfig,
    normalizer: float | None = None, dual_space: "DualSpaceProjector | None" = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """lm_weight * LM + kl_weight * D(teacher || student) (`head_losses`), plus dskd_weight * the
    DSKD objective (dskd.py) when that weight is set: (total, {"lm", "kl"[, "dskd", "dskd/..."]})."""
    total, lm, kl = head_losses(h_s, w_s, h_t, w_t, labels, cfg, normalizer)
    metrics = {"lm": lm, "kl": kl} if h_t is not None and cfg.kl_weight else {"lm": lm}  # no KL term: none shown
    if cfg.dskd_weight:
        from lrc_dist.dskd import dskd_losses  # dskd.py builds on this module

        if dual_space is None or h_t is None:
            raise ValueError("loss.dskd_weight > 0 needs a teacher and a model built with loss.dskd_weight set "
                             "(it owns the DSKD projector).")
        dskd, dskd_metrics = dskd_losses(h_s, w_s, h_t, w_t, labels != IGNORE_INDEX, dual_space, cfg, normalizer)
        total = total + dskd
        metrics.update(dskd_metrics)
    return total, metrics


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
    head, metrics = logit_losses(
        out.student_hidden.flatten(0, 1), model.student_head_weight(model.generation_matmul),
        out.teacher_hidden.flatten(0, 1), model.teacher_head_weight(),
        labels.flatten(), cfg, normalizer, model.dual_space,
    )
    weights = model.cfg.clone_term_weights
    clone = share * sum(weights.get(name, 1.0) * value for name, value in out.clone.items())
    total = head + cfg.clone_weight * clone
    metrics.update(loss=total, clone=clone)
    metrics.update({f"clone/{name}": share * value for name, value in out.clone.items()})
    return total, {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

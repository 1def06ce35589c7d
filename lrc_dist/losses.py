"""The loss terms' config and the chunked head kernel: w_lm * LM + w_kl * D(teacher || student) on
the final hidden states and heads (+ w_dskd * a head objective such as dskd.py's, when set).

Layers, imported one way: divergences.py (the D's) <- losses.py (this: the head kernel and
`logit_losses`) <- dskd.py (the DSKD objective) <- lrc.py and kd.py (each method owns its
objective: `lrc.lrc_loss` adds the clone terms). D is forward KL in the LRC paper; any divergence
of `divergences.DIVERGENCES` can replace it (`loss.divergence`); its value is logged as "kl"
whichever it is.

The LM and KL terms need the logits of both models, [tokens x vocab] each: 2 x 16k x 152k fp32 is
20 GB for one Qwen micro-batch. `head_losses` never holds them: it walks the tokens in chunks,
computes both terms in fp32 and, in the same pass, the gradient with respect to the student's
hidden states and head weight (the fused linear-cross-entropy approach of Liger-Kernel). Backward
then only scales the stored gradients. Per chunk, `head_chunk` takes the gradient of the logits in
closed form (softmax - onehot; `divergences.GRADIENTS`), with no autograd graph; with
`parallel.compile` it runs compiled (`compile_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from lrc_dist.divergences import Divergence, divergence_grad_fn

IGNORE_INDEX = -100
# Logits per chunk of the head losses, by device type. On a GPU, large chunks keep the matmuls large,
# and the caching allocator reuses the chunks' blocks. On a CPU, glibc serves blocks of 32 MiB and
# more with mmap and unmaps them on free. A chunk of 2^25 logits (128 MiB in fp32) is then mapped,
# page-faulted in zero-filled, and unmapped again for every temporary of every chunk of every step.
# 2^22 logits (16 MiB) stay on the heap (bench/RESULTS.md).
CHUNK_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 22}
# ...but never fewer tokens than this: each chunk's matmuls read the whole head, and with few rows they
# run at the memory's speed, not the cores' (a 262,144-token vocabulary at 2^22 logits is 16 tokens a
# chunk: 16 x 320 @ 320 x 262144 ran at 33 GFLOP/s on one CPU core, 128 rows at 101, 512 at 145).
# The trainer keeps freed CPU memory (resources.keep_freed_cpu_memory), so larger chunks stay cheap.
MIN_CHUNK_TOKENS = 128


def chunk_tokens(cfg: "LossConfig", vocab: int, device: torch.device) -> int:
    """Tokens per chunk of a head loss over `vocab` logits on `device` (`loss.chunk_tokens` if set)."""
    elements = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return cfg.chunk_tokens or max(MIN_CHUNK_TOKENS, elements // vocab)


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
    """tokens per chunk of the head losses; null: about 2^25 logits per chunk on a GPU, 2^22 on a
    CPU (below glibc's mmap threshold), and at least 128 tokens (MIN_CHUNK_TOKENS)"""
    dskd_weight: float = 0.0
    """weight of the dual-space KD loss (lrc_dist.dskd); 0 disables it"""
    dskd_temperature: float = 2.0
    """softmax temperature of the DSKD divergences (no T^2 factor)"""
    dskd_divergence: Divergence = "forward_kl"
    """D of both DSKD spaces"""
    dskd_mask: bool = True
    """student-space KD only where the projected teacher keeps the teacher's argmax"""
    on_policy_ratio: float = 0.0
    """on-policy distillation: this share of the training windows is continued by the current
    student (the window's first tokens as the prompt, on_policy_new_tokens sampled after them),
    and the KD, DSKD and clone terms run on the whole window, the generated tokens included; the
    LM term counts only the data tokens (lrc_dist/on_policy.py). 0: off-policy throughout"""
    on_policy_new_tokens: int = 64
    """tokens the student generates per on-policy window (at most data.seq_len)"""
    on_policy_temperature: float = 1.0
    """sampling temperature of the generated tokens (0: greedy)"""
    on_policy_top_p: float = 1.0
    """nucleus sampling of the generated tokens: the most likely tokens reaching this mass"""


def cross_entropy_grad_(z: Tensor, target: Tensor, row_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the cross-entropy of fp32 logits z [c, V] at `target` [c, 1], and row_scale [c, 1]
    times its gradient, softmax(z) - onehot(target), in z's storage (z is overwritten)."""
    lse = torch.logsumexp(z, 1, keepdim=True)
    ce = lse - z.gather(1, target)
    dz = z.sub_(lse).exp_().mul_(row_scale)
    dz.scatter_add_(1, target, -row_scale)
    return ce, dz


def head_chunk(z: Tensor, z_t: Tensor | None, y_lm: Tensor, valid: Tensor, divergence_grad, temperature: float,
               lm_weight: float, kd_weight: float, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of the head losses, forward and backward in one pass: (LM sum, D sum, d(loss)/dz).

    z [c, V] are the student's fp32 logits, z_t the teacher's (None: no D term); both are
    overwritten (d(loss)/dz is returned in z's storage). loss = scale * (lm_weight * LM +
    kd_weight * D), LM summed over the rows labelled in `y_lm`, D over the rows of `valid` (0/1).
    The gradients are closed forms (dLM/dz = softmax(z) - onehot(y), dD/ds of
    `divergences.GRADIENTS`, s = z / T): no autograd graph, no stored softmax; a few [c, V]
    temporaries at most.
    """
    lm_rows = (y_lm != IGNORE_INDEX).to(z.dtype).unsqueeze(1)
    kd = z.new_zeros(())
    kd_grad = None
    if z_t is not None:
        logq = torch.log_softmax(z / temperature, 1)
        logp = torch.log_softmax(z_t.div_(temperature), 1)
        del z_t
        kd_rows, kd_grad = divergence_grad(logq, logp)
        del logq, logp
        kd = (kd_rows * valid).sum()
    lm_tokens, dz = cross_entropy_grad_(z, y_lm.clamp(min=0).unsqueeze(1), (scale * lm_weight) * lm_rows)
    lm = (lm_tokens * lm_rows).sum()
    if kd_grad is not None:
        dz.add_(kd_grad.mul_((scale * kd_weight / temperature) * valid.unsqueeze(1)))
    return lm, kd, dz


# The per-chunk kernels of the losses, by name: head_chunk here, dskd.py's its own. `compile_kernels`
# makes `kernel` return torch.compile'd ones (`parallel.compile`): on a GPU every element-wise pass
# of eager PyTorch is a kernel launch and a round trip through memory, which a compiled kernel fuses.
EAGER_KERNELS: dict[str, Callable] = {"head": head_chunk}
_compiled_kernels: dict[str, Callable] | None = None  # None: eager


def compile_kernels(enabled: bool = True) -> None:
    """From now on `kernel` gives torch.compile'd kernels (enabled) or the eager ones, in this process."""
    global _compiled_kernels
    if not enabled:
        _compiled_kernels = None
    elif _compiled_kernels is None:
        _compiled_kernels = {}


def kernel(name: str) -> Callable:
    """The per-chunk kernel `name` of EAGER_KERNELS, compiled on first use after `compile_kernels`."""
    fn = EAGER_KERNELS[name]
    if _compiled_kernels is None:
        return fn
    if name not in _compiled_kernels:
        _compiled_kernels[name] = torch.compile(fn)
    return _compiled_kernels[name]


class _HeadLosses(torch.autograd.Function):
    """(lm_weight * LM + kd_weight * D, LM, D) from hidden states and head weights, chunked over tokens.

    Each chunk's fp32 logits go through `head_chunk` (values and d(loss)/d(logits) in one pass),
    turned at once into the gradients of h_s and w_s, so that only one chunk of logits (and a few
    temporaries of its size) is alive at a time, in forward and backward alike.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, divergence_grad, temperature, lm_weight, kd_weight, normalizer,
                chunk, lm_labels):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if need_w else None
        lm_sum = h_s.new_zeros((), dtype=torch.float32)
        kd_sum = lm_sum.clone()
        use_kd = kd_weight != 0.0 and h_t is not None
        head = kernel("head")
        for start in range(0, h_s.shape[0], chunk):
            rows = slice(start, start + chunk)
            hs, y = h_s[rows], labels[rows]
            z = (hs @ w_s.T).float()
            z_t = (h_t[rows] @ w_t.T).float() if use_kd else None
            lm, kd, dz = head(z, z_t, y if lm_labels is None else lm_labels[rows], (y != IGNORE_INDEX).float(),
                              divergence_grad, temperature, lm_weight, kd_weight, 1.0 / normalizer)
            lm_sum += lm
            kd_sum += kd
            if need_h:
                grad_h[rows] = (dz.to(w_s.dtype) @ w_s).to(h_s.dtype)
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
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None


def head_losses(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor | None,
    w_t: Tensor | None,
    labels: Tensor,
    cfg: LossConfig,
    normalizer: float | None = None,
    lm_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LM cross-entropy and D(teacher || student) at temperature T (`cfg.divergence`, forward KL by
    default), means over labelled tokens. `lm_labels` (default: `labels`) are the LM term's: an
    on-policy window's generated tokens are labelled for the KL, not for the LM term.

    h_s [N, d_S] and w_s [V, d_S] give the student logits, h_t [N, d_T] and w_t [V, d_T] the
    teacher's (None: no KL). `normalizer` replaces the local labelled-token count, e.g. by the
    global count of a gradient-accumulated, data-parallel batch. Returns (lm_weight * LM +
    kl_weight * KL, LM, KL); only the first carries gradients.
    """
    if normalizer is None:
        normalizer = max(int((labels != IGNORE_INDEX).sum()), 1)
    chunk = chunk_tokens(cfg, w_s.shape[0], h_s.device)
    kl_weight = cfg.kl_weight if h_t is not None else 0.0
    divergence_grad = divergence_grad_fn(cfg.divergence, cfg.skew)
    return _HeadLosses.apply(h_s, w_s, h_t, w_t, labels, divergence_grad, cfg.temperature, cfg.lm_weight,
                             kl_weight, float(normalizer), chunk, lm_labels)


class HeadObjective(Protocol):
    """A further objective on the final hidden states and heads (dskd.DualSpaceProjector's DSKD)."""

    def objective(self, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, valid: Tensor, cfg: LossConfig,
                  normalizer: float | None) -> tuple[Tensor, dict[str, Tensor]]: ...


def logit_losses(
    h_s: Tensor, w_s: Tensor, h_t: Tensor | None, w_t: Tensor | None, labels: Tensor, cfg: LossConfig,
    normalizer: float | None = None, dual_space: HeadObjective | None = None, lm_labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """lm_weight * LM + kl_weight * D(teacher || student) (`head_losses`), plus dskd_weight * the
    DSKD objective (the model's `dual_space`) when that weight is set: (total, {"lm", "kl"[, "dskd",
    "dskd/..."]}). Both LRC and the KD baselines build their objective on it."""
    total, lm, kl = head_losses(h_s, w_s, h_t, w_t, labels, cfg, normalizer, lm_labels)
    metrics = {"lm": lm, "kl": kl} if h_t is not None and cfg.kl_weight else {"lm": lm}  # no KL term: none shown
    if cfg.dskd_weight:
        if dual_space is None or h_t is None:
            raise ValueError("loss.dskd_weight > 0 needs a teacher and a model built with loss.dskd_weight set "
                             "(it owns the DSKD projector).")
        dskd, dskd_metrics = dual_space.objective(h_s, w_s, h_t, w_t, labels != IGNORE_INDEX, cfg, normalizer)
        total = total + dskd
        metrics.update(dskd_metrics)
    return total, metrics


def aligned_logit_losses(
    h_s: Tensor, w_s: Tensor, w_s_shared: Tensor, h_t: Tensor | None, w_t_shared: Tensor, labels: Tensor,
    cfg: LossConfig, normalizer: float | None, dual_space: HeadObjective | None, lm_labels: Tensor | None,
    aligned: Mapping[str, Tensor | float],
) -> tuple[Tensor, dict[str, Tensor]]:
    """`logit_losses` across tokenizers (lrc_dist.align): the LM term on the student's own tokens
    `labels` [B, T] (or `lm_labels`) and full head `w_s`; the KD terms at the aligned pairs only
    (`aligned`, a batch's `TeacherRetokenizer` tensors: student position align_student[b, k],
    teacher position align_teacher[b, k] where align_mask[b, k]), both heads restricted to the shared vocabulary (`w_*_shared`), means over
    the step's aligned pairs (`aligned_normalizer`; default: this micro-batch's). h_t: the
    teacher's final hidden states [B, T_t, d_T], None when no KD term is on. Both KD and LRC use it."""
    align_student, align_teacher = aligned.get("align_student"), aligned.get("align_teacher")
    align_mask, aligned_normalizer = aligned.get("align_mask"), aligned.get("aligned_normalizer")
    if normalizer is None:
        normalizer = max(int((labels != IGNORE_INDEX).sum()), 1)
    lm_target = (labels if lm_labels is None else lm_labels).flatten()
    total, lm, kl = head_losses(h_s.flatten(0, 1), w_s, None, None, lm_target, cfg, normalizer)
    metrics = {"lm": lm, "kl": kl}
    if h_t is not None:
        if align_student is None or align_teacher is None or align_mask is None:
            raise ValueError("across tokenizers the KD terms need align_student, align_teacher and align_mask "
                             "(align.TeacherRetokenizer).")
        rows, pairs = align_mask.nonzero(as_tuple=True)  # padding pairs are left out
        if aligned_normalizer is None:
            aligned_normalizer = len(rows)
        # The head's LM term is off; its labels only mark every pair as counted.
        kd, kd_metrics = logit_losses(h_s[rows, align_student[rows, pairs]], w_s_shared,
                                      h_t[rows, align_teacher[rows, pairs]], w_t_shared, torch.zeros_like(rows),
                                      replace(cfg, lm_weight=0.0), max(aligned_normalizer, 1), dual_space)
        total = total + kd
        metrics.update({k: v for k, v in kd_metrics.items() if k != "lm"})
    if align_mask is not None:
        metrics["aligned_ratio"] = align_mask.sum() / normalizer  # over micro-batches and ranks: the step's
    return total, metrics

"""Dual-Space Knowledge Distillation (DSKD, Zhang et al. 2024/2025) for teacher and student sharing a
vocabulary; the method is described in docs/METHOD.md.

Logit KD compares distributions produced by two different heads. DSKD instead decodes both models'
hidden states with one head at a time:

- student space: the teacher state projected by the trainable `t2s` [d_T, d_S] and decoded by the
  student head (detached), z_t2s = (h_t t2s) w_s^T.
  L_ce_t2s = CE(z_t2s, argmax z_t), at temperature 1 as in the public code, is the only term that
  trains `t2s`;
  L_kd_stu = D(softmax(z_t2s / T), detached || softmax(z_s / T)), optionally only on the tokens
  where argmax z_t2s == argmax z_t (the projection kept the teacher's prediction).
- teacher space: the student state projected by s2t = W_s pinv(W_t), recomputed from the current
  student head at every call, and decoded by the frozen teacher head, z_s2t = (h_s s2t) w_t^T.
  L_kd_tea = D(softmax(z_t / T) || softmax(z_s2t / T)).

L_kd = L_kd_stu + L_ce_t2s + L_kd_tea, summed over the valid tokens and divided by a normalizer; the
loss is `dskd_weight * L_kd`. D is any divergence of `divergences.DIVERGENCES` (p first in the formulas
above, called as D(logq, logp)); no T^2 factor.

Conventions: heads are stored as nn.Linear rows, w_s [V, d_S] and w_t [V, d_T], logits = h @ w.T, so
the paper's W_s (d_S x V) is w_s.T. Hidden states are flattened final-normed last-layer states,
h_s [N, d_S] and h_t [N, d_T]. Matmuls run in the inputs' dtype, the softmax and loss math in fp32
(fp16 loss math gave inf losses in the public code). No [V, d] pseudo-inverse is ever formed:
pinv(w) = pinv(w^T w) w^T needs only the d x d Gram matrix.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_dist.divergences import divergence_fn
from lrc_dist.losses import LossConfig, chunk_tokens

_RCOND = 1e-6  # singular values of a head below this fraction of its largest one count as zero
_GRAM_ROWS = 4096  # vocabulary rows per block of the float64 Gram products


def gram(a: Tensor, b: Tensor) -> Tensor:
    """a^T b in float64, summed over blocks of rows so that no float64 copy of a head exists."""
    blocks = range(0, a.shape[0], _GRAM_ROWS)
    return sum(a[i : i + _GRAM_ROWS].double().T @ b[i : i + _GRAM_ROWS].double() for i in blocks)


def _pinv_gram(w: Tensor) -> Tensor:
    """pinv(w^T w), float64 [d, d]; pinv(w) = pinv(w^T w) w^T whatever the rank of w."""
    return torch.linalg.pinv(gram(w, w), hermitian=True, rtol=_RCOND**2)


class DualSpaceProjector(nn.Module):
    """The teacher-to-student projector `t2s` [d_T, d_S] (H_t2s = h_t @ t2s), the only parameter of
    DSKD: it must be given to the optimizer. The student-to-teacher map is no parameter but a
    function of the student head (`s2t`)."""

    def __init__(self, d_teacher: int, d_student: int):
        super().__init__()
        self.t2s = nn.Parameter(torch.randn(d_teacher, d_student) * d_teacher**-0.5)
        self.lr_scale = 1.0  # t2s's learning rate as a multiple of the schedule's (see projector_lr_scale)
        # pinv(w_t^T w_t) [d_T, d_T] of the frozen teacher head: computed once, never checkpointed
        self.register_buffer("teacher_gram_pinv", None, persistent=False)

    @torch.no_grad()
    def ideal_init_(self, w_t: Tensor, w_s: Tensor) -> "DualSpaceProjector":
        """t2s = W_t pinv(W_s) = w_t^T w_s pinv(w_s^T w_s): decoding h_t @ t2s with the student head
        gives the least-squares fit of the teacher logits (exact when V <= d_S)."""
        self.t2s.copy_(gram(w_t, w_s) @ _pinv_gram(w_s))
        return self

    def s2t(self, w_s: Tensor, w_t: Tensor) -> Tensor:
        """W_s2t = W_s pinv(W_t) = w_s^T w_t pinv(w_t^T w_t), fp32 [d_S, d_T]; differentiable in w_s."""
        w_t = w_t.detach()
        cache = self.teacher_gram_pinv
        # recomputed if moved, cast (e.g. by module.to(bfloat16)) or given another teacher
        stale = cache is None or (cache.device, cache.dtype, cache.shape[0]) != (w_t.device, torch.float32, w_t.shape[1])
        if stale:
            self.teacher_gram_pinv = cache = _pinv_gram(w_t).float()
        return (w_s.T @ w_t.to(w_s.dtype)).float() @ cache

    def objective(self, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, valid: Tensor, cfg: LossConfig,
                  normalizer: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """DSKD as the head objective of `losses.logit_losses` (see `dskd_losses`)."""
        return dskd_losses(h_s, w_s, h_t, w_t, valid, self, cfg, normalizer)


def _chunk_terms(h_s, w_s, s2t, t2s, h_t, w_t, valid, *, divergence, temperature, mask) -> Tensor:
    """Sums over one chunk of tokens of (L_kd_stu, L_ce_t2s, L_kd_tea, agreement), fp32."""
    z_t = (h_t @ w_t.T).float()
    target = z_t.argmax(-1)
    # the student head is detached here so that L_ce_t2s trains the projector only
    z_t2s = ((h_t.to(t2s.dtype) @ t2s).to(w_s.dtype) @ w_s.detach().T).float()
    ce_t2s = F.cross_entropy(z_t2s, target, reduction="none")
    agree = (z_t2s.argmax(-1) == target).float()
    z_s = (h_s @ w_s.T).float()
    kd_stu = divergence(F.log_softmax(z_s / temperature, -1), F.log_softmax(z_t2s.detach() / temperature, -1))
    if mask:  # a projection that loses the teacher's prediction is no target worth following
        kd_stu = kd_stu * agree
    z_s2t = ((h_s.to(s2t.dtype) @ s2t).to(w_t.dtype) @ w_t.T).float()
    kd_tea = divergence(F.log_softmax(z_s2t / temperature, -1), F.log_softmax(z_t / temperature, -1))
    return torch.stack([(term * valid).sum() for term in (kd_stu, ce_t2s, kd_tea, agree)])


class _DualSpaceLosses(torch.autograd.Function):
    """(L_kd / normalizer, per-term sums) over chunks of tokens, as `losses._HeadLosses` does it.

    Each chunk gets a small autograd pass of its own, whose gradients with respect to h_s, w_s, s2t
    and t2s are accumulated in fp32 at once: only one chunk's [chunk x V] logits (four of them, and
    their softmax intermediates) are alive at a time, and backward only scales the stored gradients
    (no recomputation, no accumulation over chunks in bf16).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, s2t, t2s, h_t, w_t, valid, terms, normalizer, chunk, grad_enabled):
        need = [n and grad_enabled for n in ctx.needs_input_grad[:4]]  # none under no_grad (evaluation)
        grads = [torch.zeros_like(x, dtype=torch.float32) if n else None for x, n in zip((h_s, w_s, s2t, t2s), need)]
        sums = torch.zeros(4, dtype=torch.float32, device=h_s.device)
        for start in range(0, h_s.shape[0], chunk):
            rows = slice(start, start + chunk)
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(n) for x, n in zip((h_s[rows], w_s, s2t, t2s), need)]
                chunk_sums = terms(*leaves, h_t[rows], w_t, valid[rows])
                wanted = [i for i, n in enumerate(need) if n]
                loss = chunk_sums[:3].sum() / normalizer
                chunk_grads = torch.autograd.grad(loss, [leaves[i] for i in wanted]) if wanted else ()
            sums += chunk_sums.detach()
            for i, g in zip(wanted, chunk_grads):
                # h_s has a gradient per token (this chunk's rows); the matrices sum theirs over chunks
                (grads[i][rows] if i == 0 else grads[i]).add_(g)
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in (h_s, w_s, s2t, t2s)]
        ctx.mark_non_differentiable(sums)
        return sums[:3].sum() / normalizer, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None, None, None, None


def dskd_losses(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor,
    w_t: Tensor,
    valid: Tensor,
    projector: DualSpaceProjector,
    cfg: LossConfig,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(dskd_weight * L_kd, detached metrics) for one micro-batch.

    `valid` [N] (bool or 0/1) marks the tokens that count; `normalizer` divides the token sums
    (default: the valid count; a global count for gradient-accumulated, data-parallel batches).
    The loss has gradients for h_s, w_s (directly and through s2t) and projector.t2s, none for the
    teacher. Metrics: "dskd" (L_kd, unweighted), "dskd/kd_stu", "dskd/ce_t2s", "dskd/kd_tea" (all
    divided by `normalizer`) and "dskd/agree", the fraction of valid tokens whose projected teacher
    state keeps the teacher's argmax (also a sum over `normalizer`, so that micro-batches and ranks
    add up: with the default normalizer, the plain fraction).
    """
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"DSKD needs one vocabulary: student head has {w_s.shape[0]} rows, teacher head "
                         f"{w_t.shape[0]}; restrict both heads to the shared vocabulary first.")
    valid = valid.to(torch.float32)
    n_valid = valid.sum()
    if normalizer is None:
        normalizer = max(float(n_valid), 1.0)
    chunk = chunk_tokens(cfg, w_s.shape[0], h_s.device)
    terms = functools.partial(_chunk_terms, temperature=cfg.dskd_temperature, mask=cfg.dskd_mask,
                              divergence=divergence_fn(cfg.dskd_divergence, cfg.skew, field="dskd_divergence"))
    s2t = projector.s2t(w_s, w_t)  # once per call; autograd takes its gradient on to w_s
    total, sums = _DualSpaceLosses.apply(h_s, w_s, s2t, projector.t2s, h_t.detach(), w_t.detach(), valid, terms,
                                         float(normalizer), chunk, torch.is_grad_enabled())
    kd_stu, ce_t2s, kd_tea = sums[:3] / normalizer
    metrics = {"dskd": total.detach(), "dskd/kd_stu": kd_stu, "dskd/ce_t2s": ce_t2s, "dskd/kd_tea": kd_tea,
               "dskd/agree": sums[3] / normalizer}
    return cfg.dskd_weight * total, metrics


def projector_lr_scale(model: nn.Module) -> float:
    """rms(t2s) / rms(the student's trainable matrices), at initialisation: t2s's learning-rate
    multiple that makes Adam, which moves every entry by about lr per step, change it as fast
    relative to its size as the weights whose head it decodes through.

    Without it t2s, ideally initialised with entries some 50x the projections' (LRC) or a random
    student's, hardly moves at their learning rate, while the student head grows several-fold in
    the first steps; the projected teacher then stops predicting the teacher's token, and the
    agreement mask switches the student-space term off (the demo: dskd/agree 0.95 -> 0 in 10 steps).
    """
    def rms(tensors: list[Tensor]) -> float:
        return (sum(float(t.detach().float().pow(2).sum()) for t in tensors) / sum(t.numel() for t in tensors)) ** 0.5

    others = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and not n.startswith("dual_space.")]
    return rms([model.dual_space.t2s]) / rms(others)

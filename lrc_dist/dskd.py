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
from torch import Tensor, nn

from lrc_dist.divergences import divergence_grad_fn
from lrc_dist.losses import EAGER_KERNELS, LossConfig, chunk_tokens, cross_entropy_grad_, kernel

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


def _chunk_terms(h_s, w_s, s2t, t2s, h_t, w_t, valid, *, divergence_grad, temperature, mask, scale):
    """One chunk of tokens: the sums of (L_kd_stu, L_ce_t2s, L_kd_tea, agreement) in fp32, and the
    gradients of scale * (L_kd_stu + L_ce_t2s + L_kd_tea) with respect to the logits of its three
    decodings: (sums, dz_s, dz_t2s, dz_s2t). Closed forms, as `losses.head_chunk`: dD/ds of
    `divergences.GRADIENTS` (s = z / T), softmax - onehot for the cross-entropy."""
    valid = valid.unsqueeze(1)
    z_t = (h_t @ w_t.T).float()
    target = z_t.argmax(-1, keepdim=True)
    # the student head is used detached here (dz_t2s reaches t2s only): L_ce_t2s trains the projector only
    z_t2s = ((h_t.to(t2s.dtype) @ t2s).to(w_s.dtype) @ w_s.T).float()
    agree = (z_t2s.argmax(-1, keepdim=True) == target).float()
    z_s = (h_s @ w_s.T).float()
    kd_stu, dz_s = divergence_grad(torch.log_softmax(z_s.div_(temperature), 1),
                                   torch.log_softmax(z_t2s / temperature, 1))
    del z_s
    stu_rows = valid * agree if mask else valid  # a projection that loses the teacher's prediction is no target
    dz_s.mul_((scale / temperature) * stu_rows)
    ce_t2s, dz_t2s = cross_entropy_grad_(z_t2s, target, scale * valid)
    z_s2t = ((h_s.to(s2t.dtype) @ s2t).to(w_t.dtype) @ w_t.T).float()
    kd_tea, dz_s2t = divergence_grad(torch.log_softmax(z_s2t.div_(temperature), 1),
                                     torch.log_softmax(z_t.div_(temperature), 1))
    del z_s2t, z_t
    dz_s2t.mul_((scale / temperature) * valid)
    sums = torch.stack([(kd_stu.unsqueeze(1) * stu_rows).sum(), (ce_t2s * valid).sum(),
                        (kd_tea.unsqueeze(1) * valid).sum(), (agree * valid).sum()])
    return sums, dz_s, dz_t2s, dz_s2t


EAGER_KERNELS["dskd"] = _chunk_terms  # compiled after losses.compile_kernels


class _DualSpaceLosses(torch.autograd.Function):
    """(L_kd / normalizer, per-term sums) over chunks of tokens, as `losses._HeadLosses` does it.

    Each chunk's values and logit gradients come from `_chunk_terms` in one pass; they are turned at
    once into the gradients of h_s, w_s, s2t and t2s, accumulated in fp32: only one chunk's
    [chunk x V] logits (four of them, and a few temporaries) are alive at a time, and backward only
    scales the stored gradients (no recomputation, no accumulation over chunks in bf16).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, s2t, t2s, h_t, w_t, valid, terms, normalizer, chunk, grad_enabled):
        need_h, need_w, need_s2t, need_t2s = (n and grad_enabled for n in ctx.needs_input_grad[:4])  # none under no_grad
        grads = [torch.zeros_like(x, dtype=torch.float32) if n else None
                 for x, n in zip((h_s, w_s, s2t, t2s), (need_h, need_w, need_s2t, need_t2s))]
        grad_h, grad_w, grad_s2t, grad_t2s = grads
        sums = torch.zeros(4, dtype=torch.float32, device=h_s.device)
        for start in range(0, h_s.shape[0], chunk):
            rows = slice(start, start + chunk)
            hs, ht = h_s[rows], h_t[rows]
            chunk_sums, dz_s, dz_t2s, dz_s2t = terms(hs, w_s, s2t, t2s, ht, w_t, valid[rows], scale=1.0 / normalizer)
            sums += chunk_sums
            # z_s = h_s w_s^T
            if need_h:
                grad_h[rows] += dz_s.to(w_s.dtype) @ w_s
            if need_w:
                grad_w += dz_s.T.to(hs.dtype) @ hs
            # z_t2s = (h_t t2s) w_s^T, w_s detached
            if need_t2s:
                du = (dz_t2s.to(w_s.dtype) @ w_s).to(t2s.dtype)
                grad_t2s += ht.to(t2s.dtype).T @ du
            # z_s2t = (h_s s2t) w_t^T
            if need_h or need_s2t:
                dv = (dz_s2t.to(w_t.dtype) @ w_t).to(s2t.dtype)
                if need_h:
                    grad_h[rows] += dv @ s2t.T
                if need_s2t:
                    grad_s2t += hs.to(s2t.dtype).T @ dv
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
    terms = functools.partial(kernel("dskd"), temperature=cfg.dskd_temperature, mask=cfg.dskd_mask,
                              divergence_grad=divergence_grad_fn(cfg.dskd_divergence, cfg.skew, field="dskd_divergence"))
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

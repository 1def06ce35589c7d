"""The logit divergences D(teacher p || student q) the head losses and DSKD take (`loss.divergence`,
`loss.dskd_divergence`): per token, from temperature-scaled log-probabilities, called as D(logq, logp).

Each also has its gradient in closed form (`GRADIENTS`): the head kernels take D and dD/ds, where
s are the student's temperature-scaled logits (logq = log_softmax(s)), in one pass, without
autograd. With g = dD/dlogq, dD/ds = g - q sum(g); for the forward KL that is q - p."""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import torch
from torch import Tensor

# The logit divergences D(teacher || student) of DIVERGENCES, by name.
Divergence = Literal["forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "adaptive_kl", "tvd"]


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


# ---- values and gradients with respect to s (logq = log_softmax(s)), per token -------------------


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _through_softmax(g: Tensor, q: Tensor) -> Tensor:
    """dD/ds from g = dD/dlogq (in place in g): g - q sum(g)."""
    return g.sub_(q * g.sum(-1, keepdim=True))


def forward_kl_grad(logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    p = logp.exp()
    return _rowdot(p, logp - logq), logq.exp().sub_(p)


def reverse_kl_grad(logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    q, diff = logq.exp(), logq - logp
    value = _rowdot(q, diff)
    return value, diff.sub_(value.unsqueeze(-1)).mul_(q)


def js_grad(logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    logm = _log_mix(logp, logq, 0.5)
    q, q_part = logq.exp(), logq - logm
    value = 0.5 * (_rowdot(logp.exp(), logp - logm) + _rowdot(q, q_part))
    return value, _through_softmax(q_part.mul_(q).mul_(0.5), q)


def skewed_forward_kl_grad(logq: Tensor, logp: Tensor, skew: float = 0.1) -> tuple[Tensor, Tensor]:
    logm = _log_mix(logp, logq, skew)  # m = skew p + (1 - skew) q; dD/dq = -(1 - skew) p / m
    value = _rowdot(logp.exp(), logp - logm)
    g = (logp + logq).sub_(logm).exp_().mul_(-(1.0 - skew))
    return value, _through_softmax(g, logq.exp())


def skewed_reverse_kl_grad(logq: Tensor, logp: Tensor, skew: float = 0.1) -> tuple[Tensor, Tensor]:
    logm = _log_mix(logq, logp, skew)  # m = skew q + (1 - skew) p; dD/dq = log q + 1 - log m - skew q / m
    q, q_part = logq.exp(), logq - logm
    value = _rowdot(q, q_part)
    g = q_part.add_(1.0).mul_(q).sub_((2 * logq).sub_(logm).exp_().mul_(skew))
    return value, _through_softmax(g, q)


def adaptive_kl_grad(logq: Tensor, logp: Tensor, head_mass: float = 0.5) -> tuple[Tensor, Tensor]:
    with torch.no_grad():  # the weights of adaptive_kl, constants for the gradient
        p, q = logp.exp(), logq.exp()
        sorted_p, order = p.sort(dim=-1)
        tail = (sorted_p.cumsum(-1) <= head_mass).float()
        gap = (p - q).abs().gather(-1, order)
        g_tail, g_head = (gap * tail).sum(-1), (gap * (1.0 - tail)).sum(-1)
        w_head = (g_head / (g_head + g_tail).clamp_min(1e-12)).unsqueeze(-1)
    fkl, fkl_grad = forward_kl_grad(logq, logp)
    rkl, rkl_grad = reverse_kl_grad(logq, logp)
    value = w_head.squeeze(-1) * fkl + (1.0 - w_head.squeeze(-1)) * rkl
    return value, fkl_grad.mul_(w_head).add_(rkl_grad.mul_(1.0 - w_head))


def total_variation_grad(logq: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    q, diff = logq.exp(), logq.exp().sub_(logp.exp())
    value = 0.5 * diff.abs().sum(-1)
    return value, _through_softmax(diff.sign_().mul_(q).mul_(0.5), q)


GRADIENTS = {
    "forward_kl": forward_kl_grad,
    "reverse_kl": reverse_kl_grad,
    "js": js_grad,
    "skewed_forward_kl": skewed_forward_kl_grad,
    "skewed_reverse_kl": skewed_reverse_kl_grad,
    "adaptive_kl": adaptive_kl_grad,
    "tvd": total_variation_grad,
}
assert set(GRADIENTS) == set(DIVERGENCES), "every divergence needs its gradient"


def divergence_fn(name: str, skew: float, field: str = "divergence"):
    """The divergence `name` of DIVERGENCES, with `skew` bound for the skewed ones; `field` names the
    config entry in the error."""
    if name not in DIVERGENCES:
        raise ValueError(f"loss.{field}={name!r}; choose from {', '.join(DIVERGENCES)}.")
    fn = DIVERGENCES[name]
    return functools.partial(fn, skew=skew) if name.startswith("skewed") else fn


def divergence_grad_fn(name: str, skew: float, field: str = "divergence"):
    """(D, dD/ds) of the divergence `name` (`GRADIENTS`), with `skew` bound for the skewed ones."""
    divergence_fn(name, skew, field)  # the same error for an unknown name
    fn = GRADIENTS[name]
    return functools.partial(fn, skew=skew) if name.startswith("skewed") else fn

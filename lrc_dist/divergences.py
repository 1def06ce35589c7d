"""The logit divergences D(teacher p || student q) the head losses and DSKD take (`loss.divergence`,
`loss.dskd_divergence`): per token, from temperature-scaled log-probabilities, called as D(logq, logp)."""

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


def divergence_fn(name: str, skew: float, field: str = "divergence"):
    """The divergence `name` of DIVERGENCES, with `skew` bound for the skewed ones; `field` names the
    config entry in the error."""
    if name not in DIVERGENCES:
        raise ValueError(f"loss.{field}={name!r}; choose from {', '.join(DIVERGENCES)}.")
    fn = DIVERGENCES[name]
    return functools.partial(fn, skew=skew) if name.startswith("skewed") else fn

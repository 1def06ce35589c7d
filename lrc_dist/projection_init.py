"""Where LRC's projections start (`lrc.init`): random, or one basis of the teacher's residual stream.

`random` draws every projection from N(0, lrc.init_std), as the paper does
(`LowRankClone.init_weights`). The other modes find a basis U (d_T x d_S, orthonormal columns) of
the teacher's residual stream and derive every projection from it.

Why one basis for all: each P maps between the teacher's stream (d_T) and the student's (d_S).
The student's stream is the sum of what its embedding, o and down write, and its q, k, v, gate,
up and head read that sum back. The student computes a function of the teacher's only when all of
them use the same coordinates. With one U it starts as the teacher with its stream cut down to
span(U), as SliceGPT slices a model (Ashkboos et al., 2024). With d_S = d_T it is the teacher
(tests/test_projection_init.py says where exactly). Bases chosen per projection would each fit
their own matrix and leave a student whose sums mix coordinates.

From U (g: the scale of a teacher norm, its weight, or 1 + weight in Gemma; r = sqrt(d_T / d_S)):

- writes: P_o = P_down = U; P_embed = U, times r in Gemma, whose embedding scale is sqrt(width);
- reads: P = r diag(g) U for q, k, v (g of the attention norm), gate, up (the MLP norm) and an
  untied head (the final norm). The norm's weight is folded into P and the student's norm starts
  at scale 1. r: the student's RMSNorm averages over d_S features, the teacher's over d_T, so
  for a stream inside span(U) the normalised student stream is the teacher's in U divided by r;
- norms that cannot be folded: Gemma's post-norms and the final norm of a tied head. They scale by
  r diag(U^T diag(g) U) (without the r for Gemma's tied head, whose embedding already carries it),
  the nearest diagonal. That is exact when U selects channels, approximate when it rotates.

The bases:

- activation: the top d_S eigenvectors of E[n n^T]. The expectation runs over the tokens of
  lrc.init_samples training windows and the 2L + 1 streams the teacher's norms read (each layer's
  input, its stream after attention, and the final norm's), with n = x / rms(x): the inputs of
  every read. Normalising each token makes it count once, not by its norm: a few tokens carry
  huge activations in real LLMs. (Leaving out the streams after attention, which the MLPs read,
  made the demo's initial clone term 8 times larger, 10.0 against 1.2: its first-layer MLP,
  which writes huge activations, then read its input badly);
- channels: the d_S channels of most energy in the same E[n n^T] (its diagonal), kept in the
  teacher's order; U is those columns of the identity. This is RED's channel selection
  (docs/METHOD.md);
- svd: the top d_S eigenvectors of sum_M M^T M / ||M||_F^2, over the teacher matrices that touch
  the stream, with rows in d_T. The reads are W diag(g) for q, k, v, gate, up and the head; the
  writes are o^T, down^T and the embedding. These are the principal directions of the weights; no
  data is needed.

Eigenvectors come from a float64 eigh; each one's sign is fixed (largest entry positive). Every
rank computes U from the same windows. Rank 0's U is then broadcast, because the eigenvectors of
nearly equal eigenvalues are defined only up to a rotation: ranks whose kernels round differently
could pick different ones, and FSDP would assemble P from rows of different bases. A resume or an
export loads trained projections and computes none of this (`build.build_model(trained=True)`).

Cost. At the demo's scale (width 192 -> 96, 4 layers, 16 windows of 128 tokens), one CPU thread
takes 0.05 s (svd) to 0.2 s (activation, channels); bench/RESULTS.md has these numbers and the
initial losses. Qwen2.5-7B -> d_S = 2048 (d_T = 3584, 28 layers, FFN 18944, vocabulary 152064),
16 windows of 2048 tokens = 32,768 tokens, on one H100 where the trainer puts the model anyway:

- activation, channels: a teacher forward without the head, 2 * 6.5e9 * 32,768 = 4.3e14 FLOPs,
  plus the 57 streams' moments, 57 * 32,768 * 3584^2 * 2 = 4.8e13 FLOPs (float64). That is about
  2 s at 200 TFLOP/s bf16 and 1 s on FP64 tensor cores;
- svd: the Gram matrices, 3584^2 * 2 * (28 * 65,024 rows + 2 * 152,064) = 5.5e13 FLOPs (float64),
  about 1 s; no forward;
- every mode: one 3584 x 3584 float64 eigh, about 1 s on a GPU (not measured yet); it took 45 s
  on 2 CPU cores here. Rank 0's U, 59 MB in float64, is then broadcast.

In total, seconds, against hours of training. Memory: the 3584^2 float64 moment (100 MB) and one
micro-batch's activations, beside the model.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lrc_dist.dskd import gram
from lrc_dist.lrc import LowRankClone
from lrc_dist.model import Context, get_parameter, rms_norm

CALIBRATED = ("activation", "channels")  # the modes that read training windows
FOLDED = {"attn_norm": ("q", "k", "v"), "mlp_norm": ("gate", "up")}  # a pre-norm and the matrices reading it


@torch.no_grad()
def init_from_teacher(model: LowRankClone, windows: Tensor | None = None, batch_size: int = 1) -> Tensor:
    """Set `model`'s projections and student norms from the basis `model.cfg.init` names; return
    that basis U [d_T, d_S]. The teacher runs where the model is. `windows`: token ids [n, T], the
    calibration data of activation and channels, `batch_size` windows per forward."""
    mode, width = model.cfg.init, model.cfg.student_hidden_size
    if mode in CALIBRATED:
        if windows is None:
            raise ValueError(f"lrc.init={mode} needs calibration windows (token ids [n, seq_len]); "
                             f"build_model reads lrc.init_samples of them from data.paths.")
        moment = stream_moment(model, windows, batch_size)
        basis = top_channels(moment, width) if mode == "channels" else top_eigenvectors(moment, width)
    elif mode == "svd":
        basis = top_eigenvectors(weight_moment(model), width)
    else:
        raise ValueError(f"lrc.init={mode!r} computes no basis; LowRankClone.init_weights draws the random init.")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(basis, src=0)  # one U on every rank (see the module doc)
    set_basis(model, basis)
    return basis


def stream_moment(model: LowRankClone, windows: Tensor, batch_size: int = 1) -> Tensor:
    """E[n n^T] in float64 [d_T, d_T], n = x / rms(x), over the tokens of `windows` and the 2L + 1
    streams x that the teacher's norms read: each layer's input (its attention norm), its stream
    after attention (its MLP norm), and the last one (the final norm)."""
    args, device = model.teacher_args, model.teacher_embed.weight.device
    total, count = 0.0, 0

    def add(x: Tensor) -> None:
        nonlocal total, count
        n = x.flatten(0, 1).float()
        n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + args.rms_norm_eps)
        total, count = total + gram(n, n), count + n.shape[0]

    for ids in windows.split(batch_size):
        ids = ids.to(device)
        h = args.scale_embeddings(model.teacher_embed(ids))
        ctx = Context.of(model.rotary, args, ids, h.dtype, model.document_eos)
        for block in model.layers:
            add(h)
            h_next, taps = block.teacher_forward(h, ctx)
            w = block.teacher.weights()
            attn = rms_norm(taps["attn_out"], w["attn_post_norm"], args) if "attn_post_norm" in w else taps["attn_out"]
            add(h + attn)  # as model.decoder_layer adds it
            h = h_next
        add(h)
    return total / count


def weight_moment(model: LowRankClone) -> Tensor:
    """sum_M M^T M / ||M||_F^2 in float64 [d_T, d_T] over the teacher's matrices M whose rows live in
    the stream: what reads it (q, k, v, gate, up, the head; times the scale of their norm) and what
    writes it (o^T, down^T, the embedding)."""
    offset = 1.0 - model.teacher_args.family.norm_init

    def term(m: Tensor, norm: Tensor | None = None) -> Tensor:
        """(M diag(g))^T (M diag(g)) / its trace, g the scale of `norm` (none: 1), without a copy of M."""
        moment = gram(m, m)
        if norm is not None:
            g = norm.double() + offset
            moment = g[:, None] * moment * g[None, :]
        return moment / moment.trace()

    total = term(model.teacher_embed.weight) + term(model.teacher_head_weight(), model.teacher_norm.weight)
    for block in model.layers:
        t = block.teacher.weights()
        for norm, matrices in FOLDED.items():
            total = total + sum(term(t[m], t[norm]) for m in matrices)
        total = total + term(t["o"].T) + term(t["down"].T)
    return total


def top_eigenvectors(moment: Tensor, k: int) -> Tensor:
    """The eigenvectors of the k largest eigenvalues of a symmetric `moment`, as columns [d, k] in
    descending order, each signed so that its largest entry is positive."""
    _, vectors = torch.linalg.eigh(moment.double())
    u = vectors[:, -k:].flip(-1)
    return u * u.gather(0, u.abs().argmax(0, keepdim=True)).sign()


def top_channels(moment: Tensor, k: int) -> Tensor:
    """The identity's columns [d, k] of the k channels with the most energy (the diagonal of
    `moment`; ties go to the lower channel), in channel order."""
    energy = moment.diagonal()
    chosen = torch.argsort(energy, descending=True, stable=True)[:k].sort().values
    return torch.eye(moment.shape[0], dtype=torch.float64, device=moment.device)[:, chosen]


@torch.no_grad()
def set_basis(model: LowRankClone, basis: Tensor) -> None:
    """Every projection and student norm of `model` from the stream basis U (see the module doc)."""
    d_t, d_s = basis.shape
    family = model.teacher_args.family
    offset = 1.0 - family.norm_init  # a norm scales by weight + offset
    u, r = basis.double(), math.sqrt(d_t / d_s)
    embed = r if family.embed_scale else 1.0  # the ratio of the two widths' embedding scales

    def scale(weight: Tensor) -> Tensor:
        return weight.double().to(u.device) + offset

    def read(g: Tensor) -> Tensor:
        return r * g[:, None] * u

    def nearest_diagonal(g: Tensor, factor: float) -> Tensor:
        """The student norm weight whose scale is factor * diag(U^T diag(g) U)."""
        return factor * (u.pow(2).T @ g) - offset

    model.embed_proj.copy_(embed * u)
    for block in model.layers:
        g = {n: scale(get_parameter(block.teacher, hf)) for n, hf in block.norm_names.items()}
        for norm, matrices in FOLDED.items():
            for m in matrices:
                block.proj[block.cfg.projection_name(m)].copy_(read(g[norm]))
        for m in ("o", "down"):
            block.proj[m].copy_(u)
        for norm, hf in block.norm_names.items():
            if norm in FOLDED:
                get_parameter(block, hf).fill_(family.norm_init)
            else:  # Gemma's post-norms cannot fold
                get_parameter(block, hf).copy_(nearest_diagonal(g[norm], r))
    g = scale(model.teacher_norm.weight)
    if model.teacher_args.tie_word_embeddings:  # the head is the embedding's: its P cannot hold the norm
        model.norm.weight.copy_(nearest_diagonal(g, r / embed))
    else:
        model.lm_head_proj.copy_(read(g))
        model.norm.weight.fill_(family.norm_init)

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
  untied head (the final norm). The norm's weight is folded into P. r: the student's RMSNorm
  averages over d_S features, the teacher's over d_T, so for a stream inside span(U) the
  normalised student stream is the teacher's in U divided by r;
- a tied head: its P is the embedding's, which cannot hold the final norm. U is first rotated
  within its span so that U^T diag(g) U is diagonal (`head_basis`; the rest of the student does
  not change), and the final norm's scale is then fitted by least squares to the teacher's logits
  on the calibration tokens (`final_norm_scale`, also for an untied head). At d_S = d_T the
  logits are the teacher's;
- Gemma's post-norms (between o / down and the stream) cannot fold into a rotation: their g goes
  into the write, P_o = diag(g) U / rms(g), and the student's post-norm keeps the magnitude.
  When U selects channels they fold exactly: P_o = U, the student's norm g on those channels;
- every student norm is scaled by what the calibration tokens measure (`norm_scales`): the
  student normalises U^T x, which lacks the stream's part outside span(U), so without it each
  normalised read is larger than the teacher's by |x| / |U^T x|. On the real Gemma-3-270M at
  d_S = 320 these corrections took the activation init's initial lm from 35.4 to 11.5 (random:
  12.4; bench/RESULTS.md).

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
  writes are o^T, down^T and the embedding. These are the principal directions of the weights; the
  basis needs no data (the norms' scales still read the calibration windows).

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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lrc_dist.dskd import gram
from lrc_dist.lrc import LowRankClone
from lrc_dist.model import Context, get_parameter, rms_norm

DATA_BASES = ("activation", "channels")  # the modes whose basis comes from the training windows
CALIBRATED = (*DATA_BASES, "svd")  # the modes that read them (svd: for the norms' scales only)
FOLDED = {"attn_norm": ("q", "k", "v"), "mlp_norm": ("gate", "up")}  # a pre-norm and the matrices reading it


@torch.no_grad()
def init_from_teacher(model: LowRankClone, windows: Tensor | None = None, batch_size: int = 1) -> Tensor:
    """Set `model`'s projections and student norms from the basis `model.cfg.init` names; return
    that basis U [d_T, d_S]. The teacher runs where the model is. `windows`: token ids [n, T], the
    calibration data of activation and channels, `batch_size` windows per forward."""
    mode, width = model.cfg.init, model.cfg.student_hidden_size
    if mode in CALIBRATED and windows is None:
        raise ValueError(f"lrc.init={mode} needs calibration windows (token ids [n, seq_len]); "
                         f"build_model reads lrc.init_samples of them from data.paths.")
    if mode in DATA_BASES:
        moment = stream_moment(model, windows, batch_size)
        basis = top_channels(moment, width) if mode == "channels" else top_eigenvectors(moment, width)
    elif mode == "svd":
        basis = top_eigenvectors(weight_moment(model), width)
    else:
        raise ValueError(f"lrc.init={mode!r} computes no basis; LowRankClone.init_weights draws the random init.")
    basis = head_basis(model, basis)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(basis, src=0)  # one U on every rank (see the module doc)
    calibration = norm_scales(model, basis, windows, batch_size)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in calibration.tensors():
            dist.broadcast(tensor, src=0)
    set_basis(model, basis, calibration)
    return basis


def selects_channels(basis: Tensor) -> bool:
    """Whether every column of `basis` is a column of the identity (channels' U)."""
    return bool(((basis != 0).sum(0) == 1).all())


def head_basis(model: LowRankClone, basis: Tensor) -> Tensor:
    """The basis of span(`basis`) in which a tied head's final norm is diagonal: U R, R the
    eigenvectors of U^T diag(g) U. Any orthonormal basis of the span gives the same student
    everywhere else (each P is U times a matrix the rotation passes through), but the tied head
    reads the stream through the embedding's P = U, which cannot hold diag(g): in this basis the
    student's final norm holds it exactly on the span (its eigenvalues), so at d_S = d_T the
    logits are the teacher's. A basis that selects channels is kept as it is (already diagonal)."""
    if not model.teacher_args.tie_word_embeddings or selects_channels(basis):
        return basis
    g = model.teacher_norm.weight.double().to(basis.device) + 1.0 - model.teacher_args.family.norm_init
    _, rotation = torch.linalg.eigh(basis.double().T @ (g[:, None] * basis.double()))
    u = basis.double() @ rotation.flip(-1)
    return u * u.gather(0, u.abs().argmax(0, keepdim=True)).sign()


def _norms(x: Tensor) -> Tensor:
    return x.flatten(0, -2).double().norm(dim=-1).clamp_min(1e-30)


@dataclass
class Calibration:
    """What the calibration windows tell `set_basis` beyond the basis: the norms' scales, and the
    final norm's inputs, E[n_S n_S^T] [d_S, d_S] and E[n_T n_S^T] [d_T, d_S] (n: the last stream
    as each model's final norm normalises it, the student's being U^T x)."""

    scales: Tensor
    student_moment: Tensor
    cross_moment: Tensor

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.scales, self.student_moment, self.cross_moment


@torch.no_grad()
def norm_scales(model: LowRankClone, basis: Tensor, windows: Tensor, batch_size: int = 1) -> Calibration:
    """The scale of each student norm that makes it normalise as the teacher's does, measured on
    `windows` through the teacher: for a norm reading the stream x, mean |U^T x| / |x| over the
    tokens (the student normalises U^T x, which lost the stream's part outside span(U), so its
    normalised stream is larger than the teacher's by |x| / |U^T x|; 1 inside the span). Gemma's
    post-norms read o (the output of o_proj or down_proj): mean r |U^T diag(g) o| / |o| when U
    rotates (P_o = diag(g) U), mean |U^T o| / |o| when it selects channels. Order: per layer
    attn_norm, mlp_norm, attn_post_norm, mlp_post_norm (those it has), then the final norm. With
    them the moments of the final norm's inputs (`Calibration`, for `final_norm_scale`)."""
    u, (d_t, d_s) = basis.double().to(model.teacher_embed.weight.device), basis.shape
    rotates, r = not selects_channels(basis), math.sqrt(d_t / d_s)
    offset = 1.0 - model.teacher_args.family.norm_init
    sums: list[Tensor] = []
    values: list[Tensor] = []
    count, student_moment, cross_moment = 0, 0.0, 0.0

    def kept(x: Tensor, g: Tensor | None = None) -> Tensor:
        """per token: |U^T x| / |x| (stream, or a selected post-norm), r |U^T diag(g) x| / |x|"""
        flat = x.flatten(0, -2).double()
        if g is None:
            return (flat @ u).norm(dim=-1) / _norms(flat)
        return r * ((flat * g) @ u).norm(dim=-1) / _norms(flat)

    for h, after_attn, taps, w in teacher_reads(model, windows, batch_size):
        if after_attn is not None:
            values += [kept(h), kept(after_attn)]
            for norm, tap in (("attn_post_norm", "attn_out"), ("mlp_post_norm", "ffn_out")):
                if norm in w:
                    values.append(kept(taps[tap], w[norm].double() + offset if rotates else None))
            continue
        values.append(kept(h))
        sums.append(torch.stack([v.sum() for v in values]))
        values, count = [], count + h.shape[0] * h.shape[1]
        flat = h.flatten(0, -2).double()
        n_t = flat * (math.sqrt(d_t) / _norms(flat))[:, None]
        n_s = flat @ u
        n_s = n_s * (math.sqrt(d_s) / _norms(n_s))[:, None]
        student_moment, cross_moment = student_moment + n_s.T @ n_s, cross_moment + n_t.T @ n_s
    return Calibration(torch.stack(sums).sum(0) / count, student_moment / count, cross_moment / count)


def teacher_reads(model: LowRankClone, windows: Tensor, batch_size: int = 1):
    """The teacher run over `windows`, `batch_size` at a time, yielding what its norms read: per
    layer (its input, its stream after attention, its taps, its weights), then (the last stream,
    None, None, None) per batch. One layer's activations are alive at a time."""
    args, device = model.teacher_args, model.teacher_embed.weight.device
    for ids in windows.split(batch_size):
        ids = ids.to(device)
        h = args.scale_embeddings(model.teacher_embed(ids))
        ctx = Context.of(model.rotary, args, ids, h.dtype, model.document_eos)
        for block in model.layers:
            h_next, taps = block.teacher_forward(h, ctx)
            w = block.teacher.weights()
            attn = rms_norm(taps["attn_out"], w["attn_post_norm"], args) if "attn_post_norm" in w else taps["attn_out"]
            yield h, h + attn, taps, w  # as model.decoder_layer adds it
            h = h_next
        yield h, None, None, None


def stream_moment(model: LowRankClone, windows: Tensor, batch_size: int = 1) -> Tensor:
    """E[n n^T] in float64 [d_T, d_T], n = x / rms(x), over the tokens of `windows` and the 2L + 1
    streams x that the teacher's norms read: each layer's input (its attention norm), its stream
    after attention (its MLP norm), and the last one (the final norm)."""
    eps = model.teacher_args.rms_norm_eps
    total, count = 0.0, 0
    for h, after_attn, _, _ in teacher_reads(model, windows, batch_size):
        for x in (h,) if after_attn is None else (h, after_attn):
            n = x.flatten(0, 1).float()
            n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + eps)
            total, count = total + gram(n, n), count + n.shape[0]
    return total / count


def weight_moment(model: LowRankClone) -> Tensor:
    """sum_M M^T M / ||M||_F^2 in float64 [d_T, d_T] over the teacher's matrices M whose rows live in
    the stream: what reads it (q, k, v, gate, up, the head; times the scale of their norm) and what
    writes it (o^T, down^T, the embedding; times the scale of a post-norm, where the family has them)."""
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
        # a post-norm (Gemma's) scales what o and down write by its g before the stream sees it
        total = total + term(t["o"].T, t.get("attn_post_norm")) + term(t["down"].T, t.get("mlp_post_norm"))
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
def set_basis(model: LowRankClone, basis: Tensor, calibration: Calibration) -> None:
    """Every projection and student norm of `model` from the stream basis U and what calibration
    measured (`norm_scales`; see the module doc)."""
    d_t, d_s = basis.shape
    family = model.teacher_args.family
    offset = 1.0 - family.norm_init  # a norm scales by weight + offset
    u, r = basis.double(), math.sqrt(d_t / d_s)
    rotates = not selects_channels(basis)
    embed = r if family.embed_scale else 1.0  # the ratio of the two widths' embedding scales
    measured = iter(calibration.scales.double().tolist())  # in norm_scales' order

    def scale(weight: Tensor) -> Tensor:
        return weight.double().to(u.device) + offset

    def read(g: Tensor) -> Tensor:
        return r * g[:, None] * u

    def nearest_diagonal(g: Tensor, factor: float) -> Tensor:
        """The student norm scale factor * diag(U^T diag(g) U)."""
        return factor * (u.pow(2).T @ g)

    model.embed_proj.copy_(embed * u)
    for block in model.layers:
        g = {n: scale(get_parameter(block.teacher, hf)) for n, hf in block.norm_names.items()}
        for norm, matrices in FOLDED.items():
            for m in matrices:
                block.proj[block.cfg.projection_name(m)].copy_(read(g[norm]))
        student = {}
        for norm in FOLDED:
            student[norm] = torch.full((d_s,), next(measured), dtype=torch.float64)
        for norm, m in (("attn_post_norm", "o"), ("mlp_post_norm", "down")):
            if norm not in g:
                block.proj[m].copy_(u)
            elif rotates:  # the post-norm's g folds into the write, the student's norm keeps the magnitude
                # (g over its root mean square: the post-norm undoes any scale of P, and the clone
                # term compares o through P at o's own scale)
                block.proj[m].copy_(g[norm][:, None] / g[norm].pow(2).mean().sqrt() * u)
                student[norm] = torch.full((d_s,), next(measured), dtype=torch.float64)
            else:  # U selects channels: g restricted to them, exactly
                block.proj[m].copy_(u)
                student[norm] = next(measured) * nearest_diagonal(g[norm], r)
        for norm, hf in block.norm_names.items():
            get_parameter(block, hf).copy_(student[norm] - offset)
    g = scale(model.teacher_norm.weight)
    final = next(measured)
    if model.teacher_args.tie_word_embeddings:  # the head is the embedding's: its P cannot hold the norm
        student = final * nearest_diagonal(g, r / embed)
    else:
        model.lm_head_proj.copy_(read(g))
        student = torch.full((d_s,), final, dtype=torch.float64)
    model.norm.weight.copy_(final_norm_scale(model, g, calibration, student) - offset)


def final_norm_scale(model: LowRankClone, g: Tensor, calibration: Calibration, prior: Tensor) -> Tensor:
    """The student's final norm scale s [d_S] whose logits are nearest the teacher's on the
    calibration tokens: argmin_s E|H (n_S * s) - R diag(g) n_T|^2, H = R P the student's head, R
    the head's rows, both centred over the vocabulary (a softmax ignores a shift). A least-squares
    problem in d_S unknowns that needs only R^T R: (P^T G P) * E[n_S n_S^T] s = diag(P^T G diag(g)
    E[n_T n_S^T]), G = R_c^T R_c. Exact where the head can be (d_S = d_T); where it cannot, this
    places the loss of the stream's part outside span(U) where the logits mind it least. A small
    ridge towards `prior` (the unfitted scale) keeps directions the tokens never used."""
    rows = model.teacher_head_weight()
    proj = model.head_projection().double()
    mean = rows.double().mean(0)
    gram_c = gram(rows, rows) - rows.shape[0] * torch.outer(mean, mean)
    gram_c = gram_c.to(proj.device)
    lhs = (proj.T @ gram_c @ proj) * calibration.student_moment.to(proj.device)
    rhs = ((proj.T @ gram_c * g.to(proj.device)) @ calibration.cross_moment.to(proj.device)).diagonal()
    ridge = 1e-6 * lhs.diagonal().mean()
    eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs + ridge * eye, rhs + ridge * prior.to(proj.device))

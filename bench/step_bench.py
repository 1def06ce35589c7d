"""LRC training step vs (teacher forward + an equally shaped dense student's training step).

    .venv/bin/python bench/step_bench.py                       # CPU-sized model, paper's seq 2048 x 2
    .venv/bin/python bench/step_bench.py --shape qwen7b --device cuda --dtype bfloat16 --seq 2048
    .venv/bin/python bench/step_bench.py --allocator product   # as the trainer runs: no environment variable
    .venv/bin/python bench/step_bench.py --allocator product --split   # where each step's time goes
    PYTHONPATH=/tmp/main .venv/bin/python bench/step_bench.py ...      # the same bench on another tree's lrc_dist

Both sides train the same student shape on the same tokens with the same LM + KL head loss and
AdamW; the LRC side additionally generates its weights (W_T @ P), computes the clone terms and
backpropagates into the projections. Timings are interleaved (LRC, dense, LRC, ...) in one run
and the medians compared: ratio = LRC / dense (target <= 1.10). Random weights, no checkpoint.
On CPU, torch runs on one thread and steps are timed by that thread's CPU time, so that other
work on a shared machine does not skew the ratio; the wall-time ratio is printed beside it.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import fire
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from lrc_dist import losses, resources
from lrc_dist.losses import LossConfig, head_losses
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.metrics import kd_flops_per_token, lrc_flops_per_token, peak_flops
from lrc_dist.families import ModelArgs
from lrc_dist.model import CausalLM

# (model_type, hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied, student hidden)
SHAPES = {
    "cpu": ("qwen2", 512, 1408, 4, 8, 2, 64, 8192, False, 256),
    # the shape at which the step is compared with the paper's reference implementation
    "reference": ("llama", 512, 1408, 4, 8, 2, 64, 32000, False, 256),
    "llama3b": ("llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 1536),
    "qwen7b": ("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, 2048),
    # Gemma-3-270M (the real teacher of the package registry): a 262,144-token tied vocabulary
    "gemma270m": ("gemma3_text", 640, 2048, 18, 4, 1, 256, 262144, True, 320),
}
# config entries beyond the tuple's, by shape
EXTRA_CONFIG = {
    "gemma270m": dict(sliding_window=512, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                      layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3),
}


def random_model(shape: str, hidden: int | None = None, dtype=torch.float32, device="cpu") -> CausalLM:
    kind, d, inter, layers, heads, kv, hd, vocab, tied, _ = SHAPES[shape]
    cfg = AutoConfig.for_model(kind, hidden_size=hidden or d, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, vocab_size=vocab,
                               tie_word_embeddings=tied, **EXTRA_CONFIG.get(shape, {}))
    with torch.device(device):
        model = CausalLM(ModelArgs.from_hf(cfg), cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def timed(fn, device) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this thread, page faults of this thread). On a shared CPU
    machine the thread's CPU time (with torch on one thread) is the robust measure: other tenants
    inflate wall time, not it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return wall, cpu, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults


# By default glibc serves blocks of 32 MiB and more (here the 128 MiB logit chunks of the head
# loss) with mmap, unmaps them on free and page-faults them back in, zero-filled, on the next
# step: ~0.1 s per step on this machine, and how many of them a step maps depends on which free
# heap blocks happen to fit. The CUDA caching allocator keeps freed blocks; so does glibc with
# these settings (every block from the heap, the heap never trimmed). The bench prints the page
# faults per step: with them, a few thousand at most (the heap growing), against ~459k without.
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
                     "MALLOC_TOP_PAD_": str(1 << 30)}


def main(shape: str = "cpu", batch: int = 2, seq: int = 2048, steps: int = 3, device: str = "cpu",
         dtype: str = "float32", checkpointing: bool = False, threads: int = 1, allocator: str = "bench",
         chunk_tokens: int | None = None, sides: str = "both", split: bool = False, compile: bool = False,
         head_logits: str = "auto", versus_head_logits: str | None = None, versus_chunk_tokens: int | None = None,
         floor: bool = False):
    """allocator (CPU): bench, glibc told by CPU_ALLOCATOR_ENV to keep freed memory (the bench
    re-executes itself with it); product, what the trainer does with no environment variable
    (lrc_dist.resources.keep_freed_cpu_memory, where the imported lrc_dist has it); glibc, its
    defaults. chunk_tokens: the head loss's (loss.chunk_tokens; default: by device type).
    sides: both, lrc or dense (one side alone: its own peak memory). split: also time each part
    of a step on its own (weight generation, teacher forward, head loss, optimizer; the student's
    forward and backward with the clone terms are the rest). compile: parallel.compile on both
    sides (each LRC block's, each teacher and dense student layer's forward, the head kernels);
    the warm-up steps compile. head_logits: lrc.head_logits. versus_head_logits, versus_chunk_tokens:
    a second LRC side ("LRC versus") with these settings (the others as the first's), timed
    interleaved with it. floor: each LRC side's FLOP floor, the matmul FLOPs its step executes
    (PyTorch's FLOP counter, recompute included) and its attention at half the unmasked count,
    at the best speed of the step's own matmul shapes timed alone; and the step's ratio to it."""
    if allocator not in ("bench", "product", "glibc"):
        raise ValueError(f"--allocator {allocator!r}: bench, product or glibc")
    if sides not in ("both", "lrc", "dense"):
        raise ValueError(f"--sides {sides!r}: both, lrc or dense")
    if device == "cpu" and allocator == "bench" and any(os.environ.get(k) != v for k, v in CPU_ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_ALLOCATOR_ENV})
    if device == "cpu" and allocator == "product" and hasattr(resources, "keep_freed_cpu_memory"):
        resources.keep_freed_cpu_memory()
    torch.set_num_threads(threads)
    dev, dt = torch.device(device), getattr(torch, dtype)
    torch.manual_seed(0)
    d_s = SHAPES[shape][-1]
    loss_cfg = LossConfig(chunk_tokens=chunk_tokens)
    versus = versus_head_logits is not None or versus_chunk_tokens is not None
    lrc_sides = {"LRC": (head_logits, loss_cfg)}
    if versus:
        lrc_sides["LRC versus"] = (versus_head_logits or head_logits,
                                   LossConfig(chunk_tokens=versus_chunk_tokens or chunk_tokens))
    ids = torch.randint(0, SHAPES[shape][7], (batch, seq + 1), device=dev)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    teacher = random_model(shape, dtype=dt, device=dev).requires_grad_(False) if sides != "lrc" or split else None
    tokens = batch * seq
    steppers, optimizers = {}, {}
    if compile:
        from lrc_dist.losses import compile_kernels
        compile_kernels()

    def compiled(units):
        for unit in units if compile else ():
            unit.forward = torch.compile(unit.forward)

    compiled(teacher.model.layers if teacher is not None else ())
    models = {}
    for side, (head, cfg) in lrc_sides.items() if sides != "dense" else ():
        lrc = models[side] = LowRankClone(random_model(shape, dtype=dt, device=dev), LRCConfig(d_s, head_logits=head))
        lrc.init_weights()
        lrc.to(dev)
        for block in lrc.layers:
            block.activation_checkpointing = checkpointing
        compiled(lrc.layers)
        optimizers[side] = torch.optim.AdamW([p for p in lrc.parameters() if p.requires_grad], lr=1e-5,
                                             weight_decay=0.0)

        def lrc_forward(lrc=lrc, cfg=cfg):
            with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
                return lrc(inputs, labels, cfg)[0]

        steppers[side] = lrc_forward
    lrc = models.get("LRC")
    if sides != "lrc":
        student = random_model(shape, hidden=d_s, dtype=torch.float32, device=dev)  # fp32 masters, like LRC's
        compiled(student.model.layers)
        optimizers["dense"] = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)

        def dense_forward():
            with torch.no_grad():
                h_t = teacher.hidden_states(inputs)
            with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
                h_s = student.hidden_states(inputs)
                return head_losses(h_s.flatten(0, 1), student.lm_head_weight, h_t.flatten(0, 1),
                                   teacher.lm_head_weight, labels.flatten(), loss_cfg)[0]

        steppers["dense"] = dense_forward

    def train_step(side):
        def step():
            steppers[side]().backward()
            optimizers[side].step()
            optimizers[side].zero_grad(set_to_none=True)
        return step

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        for side in steppers:
            train_step(side)()
    times = {side: [] for side in steppers}
    for _ in range(steps):  # interleaved
        for side in steppers:
            times[side].append(timed(train_step(side), dev))
    # CPU: this thread's CPU time (exact only with threads=1); GPU: wall time, synchronised.
    clock = 1 if dev.type == "cpu" and threads == 1 else 0
    median = {side: statistics.median(t[clock] for t in ts) for side, ts in times.items()}
    print(f"shape={shape} d_S={d_s} batch={batch} seq={seq} device={device} dtype={dtype} "
          f"threads={torch.get_num_threads()} checkpointing={checkpointing} allocator={allocator} "
          f"chunk_tokens={chunk_tokens or 'default'} sides={sides} compile={compile} head_logits={head_logits}")
    for side, model in models.items():
        chunk = losses.chunk_tokens(lrc_sides[side][1], model.vocab_size, dev)
        print(f"{side}: head_logits={lrc_sides[side][0]} ({'projected' if model.projects_head(tokens) else 'generated'}"
              f"), {chunk} tokens per head-loss chunk")
    for side, t in median.items():
        what = "  (teacher fwd + student train)" if side == "dense" else ""
        print(f"{side + ' step':15s} {t * 1e3:9.1f} ms  {tokens / t:10.0f} tokens/s{what}")
    if "LRC versus" in median:
        print(f"ratio LRC/LRC versus = {median['LRC'] / median['LRC versus']:.3f}")
    if "LRC" in median and "dense" in median:
        wall = statistics.median(t[0] for t in times["LRC"]) / statistics.median(t[0] for t in times["dense"])
        print(f"ratio LRC/dense = {median['LRC'] / median['dense']:.3f}  (target <= 1.10; "
              f"{'thread CPU' if clock else 'wall'} time; wall-time ratio {wall:.3f})")
        formula, causal = flop_ratios(lrc, student, seq, tokens)
        print(f"FLOP ratio LRC/dense = {formula:.3f} by the metrics formulas, {causal:.3f} with causal attention at "
              f"half their count (what the kernels skip): the ratio a step at equal efficiency on both sides gets")
    if dev.type == "cpu":
        faults = ", ".join(f"{side} {max(t[2] for t in ts)}" for side, ts in times.items())
        print(f"page faults per step, at most: {faults}")
        print(f"peak resident memory of the process ({sides}): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    elif dev.type == "cuda":
        print(f"peak allocated memory ({sides}): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if split:
        for side in steppers:
            print_split(side, median[side], split_parts(side, locals()), steps, dev, clock)
    if floor:
        speed = matmul_speed(models["LRC"], tokens, dev, clock, steps) if models else None
        for side, model in models.items():
            print_floor(side, median[side], step_flops(model, steppers[side], seq, tokens), speed)
    peak = peak_flops(dev, None)
    if peak and "LRC" in median:
        flops = lrc_flops_per_token(lrc.teacher_args, d_s, seq, tokens)
        print(f"MFU (LRC) = {tokens / median['LRC'] * flops / peak:.3f}")
    if "LRC" in median and "dense" in median:
        return median["LRC"] / median["dense"]
    return median["dense" if sides == "dense" else "LRC"]


def flop_ratios(lrc: LowRankClone, student: CausalLM, seq: int, tokens: int) -> tuple[float, float]:
    """(LRC step / dense side) in model FLOPs: by metrics' formulas, which count attention without
    the causal discount as MFU conventionally does; and with the attention's scores and weighted
    values at half that, which is about what causal kernels compute (CPU flash attention measured
    0.6x of the unmasked time here)."""
    teacher = lrc.teacher_args
    lrc_flops = lrc_flops_per_token(teacher, lrc.cfg.student_hidden_size, seq, tokens)
    dense_flops = kd_flops_per_token(student.args, teacher, seq)
    # attention per token: teacher forward 4 * seq * q per layer, the student's forward and backward 3x that
    half = teacher.num_layers * 4 * seq * teacher.num_heads * teacher.head_dim * (1 + 3) / 2
    return lrc_flops / dense_flops, (lrc_flops - half) / (dense_flops - half)


def split_parts(side: str, env: dict) -> dict:
    """The parts of a step of `side` that run on their own, each a callable: the head loss on
    random final states of the right shapes, forward and backward; the teacher's forward; for
    LRC, every generated weight (W_T @ P, the head's included) forward and backward; the
    optimizer's step on the gradients of one backward."""
    teacher, inputs, labels, loss_cfg, dev = env["teacher"], env["inputs"], env["labels"], env["loss_cfg"], env["dev"]
    is_lrc = side in env["models"]
    opt, model = env["optimizers"][side], env["models"][side] if is_lrc else env["student"]
    if is_lrc:
        loss_cfg = env["lrc_sides"][side][1]
    d_t, d_s, n = teacher.args.hidden_size, env["d_s"], inputs.numel()
    project = is_lrc and model.projects_head(n)
    h_s = torch.randn(n, d_t if project else d_s, device=dev, dtype=teacher.lm_head_weight.dtype, requires_grad=True)
    h_t = torch.randn(n, d_t, device=dev, dtype=teacher.lm_head_weight.dtype)
    # a projected head reads the teacher's (no gradient); else the student's own, which takes one
    w_s = teacher.lm_head_weight if project else torch.randn(teacher.lm_head_weight.shape[0], d_s, device=dev,
                                                             requires_grad=True)
    parts = {}

    def head():
        head_losses(h_s, w_s.to(h_s.dtype), h_t, teacher.lm_head_weight, labels.flatten(), loss_cfg)[0].backward()

    def teacher_forward():
        with torch.no_grad():
            teacher.hidden_states(inputs)

    parts["teacher forward"] = teacher_forward
    if is_lrc:
        def generation():
            generated = [w for block in model.layers for w in block.student_weights().values() if w.requires_grad]
            if not project:
                generated.append(model.student_head_weight())
            torch.autograd.backward(generated, [torch.ones_like(w) for w in generated])
        parts["weight generation"] = generation
    parts["head loss"] = head

    def optimizer():
        opt.step()
    env["steppers"][side]().backward()  # gradients for the optimizer to step on
    parts["optimizer"] = optimizer
    return parts


def step_flops(model: LowRankClone, forward, seq: int, tokens: int) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one training step of `model`: the matmuls as PyTorch's FLOP
    counter sees them (forward, backward and any recompute), the attention's scores and weighted
    values by formula (the counter has none for CPU attention kernels) at half the unmasked count:
    the teacher's forward, the student's forward and backward (2x), and its recompute."""
    with FlopCounterMode(display=False) as counter:
        forward().backward()
    model.zero_grad(set_to_none=True)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in counts.items() if op in ("aten.mm", "aten.addmm", "aten.bmm"))
    a = model.teacher_args
    passes = 1 + 3 + model.layers[0].activation_checkpointing
    attention = tokens * passes * a.num_layers * 4 * seq * a.num_heads * a.head_dim / 2
    return float(matmuls), attention


def matmul_speed(model: LowRankClone, tokens: int, dev, clock: int, steps: int) -> float:
    """The best FLOP/s of the step's main matmul shapes, each timed alone: a token batch through the
    teacher's FFN (both ways), a head-loss chunk against the vocabulary at both widths, and a weight
    generation (W_T @ P) of the FFN and of the head."""
    a, d_s = model.teacher_args, model.cfg.student_hidden_size
    chunk = losses.chunk_tokens(LossConfig(), a.vocab_size, dev)
    shapes = [(tokens, a.hidden_size, a.intermediate_size), (tokens, a.intermediate_size, a.hidden_size),
              (chunk, a.hidden_size, a.vocab_size), (chunk, d_s, a.vocab_size),
              (a.intermediate_size, a.hidden_size, d_s), (a.vocab_size, a.hidden_size, d_s)]
    speeds = {}
    for m, k, n in shapes:
        x, y = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        x @ y  # warm-up
        seconds = statistics.median(timed(lambda x=x, y=y: x @ y, dev)[clock] for _ in range(max(steps, 3)))
        speeds[f"{m}x{k} @ {k}x{n}"] = 2 * m * k * n / seconds
    print("matmul speed alone: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in speeds.items()))
    return max(speeds.values())


def print_floor(side: str, seconds: float, flops: tuple[float, float], speed: float) -> None:
    matmuls, attention = flops
    floor = (matmuls + attention) / speed
    print(f"{side} FLOP floor: {matmuls / 1e9:.0f} GFLOP of matmuls + {attention / 1e9:.0f} GFLOP of causal "
          f"attention at {speed / 1e9:.0f} GFLOP/s = {floor * 1e3:.0f} ms; step {seconds * 1e3:.0f} ms = "
          f"{seconds / floor:.2f}x the floor")


def print_split(side: str, total: float, parts: dict, steps: int, dev, clock: int) -> None:
    spent = {}
    for name, fn in parts.items():
        fn()  # warm-up
        spent[name] = statistics.median(timed(fn, dev)[clock] for _ in range(steps))
    rest = "student forward/backward + clone terms" if side != "dense" else "student forward/backward"
    spent[rest] = total - sum(spent.values())
    print(f"{side} step split ({total * 1e3:.0f} ms): " +
          ", ".join(f"{name} {t * 1e3:.0f} ms ({t / total:.0%})" for name, t in spent.items()))


if __name__ == "__main__":
    fire.Fire(main)

"""The head losses (LM + divergence, and DSKD) of this tree against another revision's, in one process.

    .venv/bin/python bench/head_bench.py --baseline c28a957                  # the cpu bench's head
    .venv/bin/python bench/head_bench.py --baseline c28a957 --vocab 32000    # the reference shape's
    .venv/bin/python bench/head_bench.py --baseline c28a957 --what dskd --tokens 1024
    .venv/bin/python bench/head_bench.py --baseline c28a957 --compile        # + this tree's kernels compiled

Loads the revision's lrc_dist/losses.py and lrc_dist/dskd.py from a git worktree (bench/versus.py's)
as separate modules beside this tree's, and times forward + backward of each, interleaved, on the
same random inputs: N tokens of final states (d_S student, d_T teacher), heads of `vocab` rows,
fp32, one thread, this thread's CPU time. Also checks that both give the same loss and gradients.
The product's allocator settings (keep_freed_cpu_memory) are on for both.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import fire
import torch

from lrc_dist import dskd, losses
from lrc_dist.resources import keep_freed_cpu_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from versus import worktree  # noqa: E402


def load(tree: Path, name: str):
    """`tree`'s lrc_dist/<name>.py as a module of its own (its imports resolve to this tree's package)."""
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", tree / "lrc_dist" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(baseline: str = "c28a957", what: str = "head", tokens: int = 4096, vocab: int = 8192, d_s: int = 256,
         d_t: int = 512, divergence: str = "forward_kl", steps: int = 5, chunk_tokens: int | None = None,
         compile: bool = False):
    keep_freed_cpu_memory()
    torch.set_num_threads(1)
    tree = worktree(baseline)
    old_losses = load(tree, "losses")
    torch.manual_seed(0)
    h_s = (torch.randn(tokens, d_s) * 0.5).requires_grad_(True)
    w_s = (torch.randn(vocab, d_s) * 0.1).requires_grad_(True)
    h_t, w_t = torch.randn(tokens, d_t) * 0.5, torch.randn(vocab, d_t) * 0.1
    labels = torch.randint(0, vocab, (tokens,))
    if what == "head":
        cfg = {"divergence": divergence, "chunk_tokens": chunk_tokens}
        sides = {
            f"baseline {baseline}": lambda: old_losses.head_losses(h_s, w_s, h_t, w_t, labels,
                                                                   old_losses.LossConfig(**cfg))[0],
            "this tree": lambda: losses.head_losses(h_s, w_s, h_t, w_t, labels, losses.LossConfig(**cfg))[0],
        }
        params = [h_s, w_s]
    elif what == "dskd":
        old_dskd = load(tree, "dskd")
        projector = dskd.DualSpaceProjector(d_t, d_s).ideal_init_(w_t, w_s.detach())
        cfg = {"dskd_weight": 1.0, "dskd_divergence": divergence, "chunk_tokens": chunk_tokens}
        valid = labels >= 0
        sides = {
            f"baseline {baseline}": lambda: old_dskd.dskd_losses(h_s, w_s, h_t, w_t, valid, projector,
                                                                 old_dskd.LossConfig(**cfg))[0],
            "this tree": lambda: dskd.dskd_losses(h_s, w_s, h_t, w_t, valid, projector, losses.LossConfig(**cfg))[0],
        }
        params = [h_s, w_s, projector.t2s]
    else:
        raise ValueError(f"--what {what!r}: head or dskd")

    if compile:  # parallel.compile's kernels (losses.compile_kernels), beside the eager ones
        compiled_kernels = {}

        def compiled(fn):
            def call():
                losses._compiled_kernels = compiled_kernels  # compiled once, kept between the calls
                try:
                    return fn()
                finally:
                    losses._compiled_kernels = None
            return call
        sides["this tree, compiled"] = compiled(sides["this tree"])

    def step(fn):
        loss = fn()
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    results = {name: step(fn) for name, fn in sides.items()}  # warm-up (compiles), and the equality check
    loss_a, grads_a = results[f"baseline {baseline}"]
    times = {name: [] for name in sides}
    for _ in range(steps):
        for name, fn in sides.items():
            start = time.thread_time()
            step(fn)
            times[name].append(time.thread_time() - start)
    print(f"what={what} tokens={tokens} vocab={vocab} d_S={d_s} d_T={d_t} divergence={divergence} "
          f"chunk_tokens={chunk_tokens or 'default'} steps={steps}")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians[f"baseline {baseline}"]
    for name, t in medians.items():
        loss_b, grads_b = results[name]
        err = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(grads_a, grads_b))
        print(f"{name:22s} {t * 1e3:8.1f} ms forward + backward, baseline / it = {base / t:.3f}; "
              f"loss {float(loss_b):.6f}, max gradient difference to the baseline's / its max {err:.1e}")


if __name__ == "__main__":
    fire.Fire(main)

"""What each projection init (lrc.init) costs and where the student starts.

    .venv/bin/python bench/init_bench.py --demo_dir runs/demo                   # the demo's trained teacher
    .venv/bin/python bench/init_bench.py --shape qwen7b --device cuda --dtype bfloat16 --seq 2048   # cost only

With the demo's teacher (`python -m lrc_dist.demo --out runs/demo`, width 192 -> student 96), each mode
is built as the trainer builds it (`build.build_model`, the demo's settings: 16 windows of 128 tokens a
forward). The init is timed by the CPU time of the one thread torch runs on, which other work on a
shared machine does not inflate; wall time is printed beside it. The init includes reading the
calibration windows, the teacher forward, the moments, the eigh and setting every projection. The
student's initial loss terms (the demo's loss: T = 2, kl_weight 1, clone_weight 0.5) are measured on
16 held-out windows, with the effective rank of its final hidden states, the teacher's next to it.
With --shape, a random teacher of that shape (bench/step_bench.py's) on --device: the cost only.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import fire
import numpy as np
import torch

from lrc_dist.build import build_model, calibration_windows
from lrc_dist.config import load_config
from lrc_dist.data import TokenSet
from lrc_dist.evaluate import effective_rank
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.projection_init import init_from_teacher
from step_bench import SHAPES, random_model

MODES = ("random", "activation", "channels", "svd")


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.thread_time() - cpu, time.perf_counter() - wall


def demo(root: Path, width: int, repeats: int) -> None:
    teacher = next((root / "teacher").glob("export_*/hf"))

    def cfg_of(mode: str):  # the demo's student settings
        return load_config(None, {
            "model.teacher": str(teacher), "data.paths": [str(root / "tokens/train")], "model.dtype": "float32",
            "model.lrc.student_hidden_size": width, "model.lrc.init": mode, "data.seq_len": 128,
            "micro_batch_size": 16, "global_batch_size": 16, "steps": 150, "loss.temperature": 2.0,
            "parallel.backend": "none"})

    held = TokenSet.open(root / "tokens/held_out")
    ids = torch.as_tensor(np.stack([held.read(w * 129, 129) for w in range(16)]).astype(np.int64))
    print("| lrc.init | init CPU s (median) | init wall s | loss | lm | kl | clone | effective rank, student (teacher) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        cfg = cfg_of(mode)
        model = build_model(cfg, trained=True)  # the teacher loaded, no init yet

        def init():
            if mode == "random":
                model.init_weights(cfg.seed)
            else:
                init_from_teacher(model, calibration_windows(cfg, model.vocab_size), cfg.micro_batch_size)

        times = [timed(init, torch.device("cpu")) for _ in range(repeats)]
        with torch.no_grad():
            out = model.lockstep(ids[:, :-1])
            _, m = model(ids[:, :-1], ids[:, 1:], cfg.loss)
        cpu, wall = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        print(f"| {mode} | {cpu:.3f} | {wall:.3f} | {m['loss']:.3f} | {m['lm']:.3f} | {m['kl']:.4f} | {m['clone']:.3f} "
              f"| {effective_rank(out.student_hidden):.1f} ({effective_rank(out.teacher_hidden):.1f}) |", flush=True)


def shaped(shape: str, device: str, dtype: str, seq: int, samples: int, batch: int) -> None:
    dev, width = torch.device(device), SHAPES[shape][-1]
    windows = torch.randint(0, SHAPES[shape][7], (samples, seq))

    def cost(mode: str) -> tuple[float, float]:  # one model at a time on the device
        model = LowRankClone(random_model(shape, dtype=getattr(torch, dtype), device=dev), LRCConfig(width, init=mode))
        return timed(lambda: init_from_teacher(model, windows, batch), dev)

    for mode in MODES[1:]:
        cpu, wall = cost(mode)
        print(f"{shape} {mode}: {wall:.2f} s wall ({cpu:.2f} s CPU), {samples} x {seq} tokens", flush=True)


def main(demo_dir: str | None = None, width: int = 96, repeats: int = 3, shape: str | None = None,
         device: str = "cpu", dtype: str = "float32", seq: int = 2048, samples: int = 16, batch: int = 2,
         threads: int = 1) -> None:
    torch.set_num_threads(threads)
    if shape:
        shaped(shape, device, dtype, seq, samples, batch)
    else:
        demo(Path(demo_dir or "runs/demo"), width, repeats)


if __name__ == "__main__":
    fire.Fire(main)

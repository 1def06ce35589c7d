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

With --teacher, a real pretrained checkpoint (e.g. Gemma-3-270M converted by data_prep/convert_gguf.py):
each mode at each of --widths, calibrated on --calibration_windows windows of --window tokens of the
demo corpus (Python's documentation, as the demo trains on) in the teacher's tokens, and measured
before any update on --held_out (default: the repository's LICENSE, English prose outside that
corpus): lm, KL at T = 1 and the clone term, one forward over the held-out windows.

    .venv/bin/python bench/init_bench.py --teacher teachers/gemma-3-270m --widths 320,480
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


def real(teacher: Path, widths: tuple[int, ...], held_out: Path, seq: int, samples: int, modes: tuple[str, ...]) -> None:
    from transformers import AutoTokenizer

    from lrc_dist.demo import documents
    from lrc_dist.losses import LossConfig
    from lrc_dist.model import CausalLM

    tok = AutoTokenizer.from_pretrained(teacher)
    corpus = tok("\n\n".join(text for _, text in documents()[:400])).input_ids
    windows = torch.tensor(corpus[: samples * seq]).view(samples, seq)
    held = torch.tensor(tok(held_out.read_text()).input_ids)
    held = held[: held.numel() // (seq + 1) * (seq + 1)].view(-1, seq + 1)[:2]
    base = CausalLM.from_pretrained(teacher)
    loss_cfg = LossConfig(temperature=1.0, clone_weight=1.0)
    with torch.no_grad():
        t_logits = base(held[:, :-1])
        t_lm = torch.nn.functional.cross_entropy(t_logits.flatten(0, 1), held[:, 1:].flatten()).item()
    print(f"teacher {teacher}: held-out lm {t_lm:.3f} ({held.numel() - len(held)} tokens of {held_out.name}); "
          f"uniform {np.log(base.args.vocab_size):.2f}; calibration {samples} x {seq} tokens")
    print("| d_S | lrc.init | init wall s | lm | kl (T = 1) | clone |")
    print("|---|---|---|---|---|---|")
    for width in widths:
        for mode in modes:
            model = LowRankClone(base, LRCConfig(width, init=mode))
            _, wall = timed(lambda: model.init_weights(0) if mode == "random" else init_from_teacher(model, windows),
                            torch.device("cpu"))
            with torch.no_grad():
                _, m = model(held[:, :-1], held[:, 1:], loss_cfg)
            print(f"| {width} | {mode} | {wall:.1f} | {m['lm']:.2f} | {m['kl']:.2f} | {m['clone']:.4g} |", flush=True)


def listed(value) -> tuple:
    """A fire argument given as 320,480 (a tuple to fire) or as one value."""
    return tuple(value) if isinstance(value, (tuple, list)) else tuple(str(value).split(","))


def main(teacher: str | None = None, widths: str = "320,480", held_out: str = "LICENSE",
         calibration_windows: int = 16, window: int = 256, modes: str = ",".join(MODES),
         demo_dir: str | None = None, width: int = 96, repeats: int = 3, shape: str | None = None,
         device: str = "cpu", dtype: str = "float32", seq: int = 2048, samples: int = 16, batch: int = 2,
         threads: int = 1) -> None:
    torch.set_num_threads(threads)
    if teacher:
        real(Path(teacher), tuple(int(w) for w in listed(widths)), Path(held_out), window, calibration_windows,
             listed(modes))
    elif shape:
        shaped(shape, device, dtype, seq, samples, batch)
    else:
        demo(Path(demo_dir or "runs/demo"), width, repeats)


if __name__ == "__main__":
    fire.Fire(main)

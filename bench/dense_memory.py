"""The memory the dense phase (lrc.dense_after) costs at real shapes, counted from the model itself.

    .venv/bin/python bench/dense_memory.py                 # qwen7b -> 2048 and llama3b -> 1536, 8 ranks
    .venv/bin/python bench/dense_memory.py --ranks 16

The models are built on the meta device (no memory, no weights): the LRC model of each shape and
the same model densified, with P_o/P_down training or frozen. Per trainable parameter the run
keeps an fp32 master, an fp32 gradient and AdamW's two fp32 moments (16 bytes), sharded over
the ranks by FSDP2 and ZeRO-3; the frozen teacher is the same in both phases and not counted.
The switch itself holds the dense student's fp32 tensors once in each rank's host memory
(train.dense_state).
"""

from __future__ import annotations

import fire
import torch

from lrc_dist.lrc import LowRankClone, LRCConfig
from step_bench import SHAPES, random_model

BYTES_PER_TRAINABLE = 4 + 4 + 8  # fp32 master, fp32 gradient, AdamW exp_avg and exp_avg_sq


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def counts(shape: str) -> dict[str, int]:
    """Trainable parameters of the LRC model and of its dense phase (P_o/P_down trained, frozen)."""
    d_s = SHAPES[shape][-1]
    out = {}
    with torch.device("meta"):
        for mode in ("train", "freeze"):
            model = LowRankClone(random_model(shape, device="meta"), LRCConfig(d_s, dense_projections=mode))
            out["lrc"] = trainable(model)
            model.densify({})
            out[f"dense_{mode}"] = trainable(model)
            out["student"] = sum(p.numel() for n, p in model.named_parameters()
                                 if n in ("embed_dense", "lm_head_dense") or ".dense." in n)
    return out


def main(shapes: str = "qwen7b,llama3b", ranks: int = 8) -> None:
    gib = 2**30
    print(f"| teacher -> d_S | trainable, LRC | trainable, dense (P train / frozen) | student matrices | "
          f"optimizer state per rank at {ranks} ranks, LRC -> dense | switch: host memory per rank |")
    print("|---|---|---|---|---|---|")
    for shape in shapes.split(","):
        c = counts(shape)
        lrc, dense = c["lrc"] * BYTES_PER_TRAINABLE / ranks / gib, c["dense_train"] * BYTES_PER_TRAINABLE / ranks / gib
        print(f"| {shape} -> {SHAPES[shape][-1]} | {c['lrc'] / 1e9:.3f}B | {c['dense_train'] / 1e9:.3f}B / "
              f"{c['dense_freeze'] / 1e9:.3f}B | {c['student'] / 1e9:.3f}B | {lrc:.2f} -> {dense:.2f} GiB "
              f"(x{dense / lrc:.2f}) | {c['student'] * 4 / gib:.1f} GiB |")


if __name__ == "__main__":
    fire.Fire(main)

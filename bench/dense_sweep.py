"""Why the dense phase gains what it gains at demo scale: LRC students with the dense phase at other
starts and learning rates, on a finished demo's teacher and data, at the demo's token budget.

    .venv/bin/python -m lrc_dist.demo --out runs/demo --beyond       # first: the demo and its dense students
    .venv/bin/python bench/dense_sweep.py --demo runs/demo            # then this (~3 min per student on 2 cores)

Each student is the demo's `lrc_dense` (random init, P_o/P_down training, lrc.dense_after 0.5,
lrc.dense_lr_scale 1) with one setting changed (the last, two); it trains into DEMO/dense_sweep/NAME (a finished
one is reused) and prints its held-out perplexity and effective rank beside the demo's LRC and
lrc_dense, read from the demo's results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from lrc_dist.demo import PRESETS, RANK_WINDOWS, run_training
from lrc_dist.evaluate import perplexity

VARIANTS = {
    "dense_after 0.25": {"model.lrc.dense_after": 0.25},
    "dense_lr_scale 0.1": {"model.lrc.dense_after": 0.5, "model.lrc.dense_lr_scale": 0.1},
    "dense_lr_scale 0.3": {"model.lrc.dense_after": 0.5, "model.lrc.dense_lr_scale": 0.3},
    "dense_lr_scale 3": {"model.lrc.dense_after": 0.5, "model.lrc.dense_lr_scale": 3.0},
    "dense_lr_scale 10": {"model.lrc.dense_after": 0.5, "model.lrc.dense_lr_scale": 10.0},
    # two settings changed: does the learning rate's gain stack on the activation init's?
    "activation init, dense_lr_scale 3": {"model.lrc.init": "activation", "model.lrc.dense_after": 0.5,
                                          "model.lrc.dense_lr_scale": 3.0},
}


def main(demo: str = "runs/demo", preset: str = "default", only: str = "") -> None:
    """The table of VARIANTS (`only`: those whose names contain one of these comma-separated words)."""
    root, p = Path(demo), PRESETS[preset]
    results = json.loads((root / "results.json").read_text())
    if "lrc_dense" not in results:
        raise SystemExit(f"{root / 'results.json'} has no lrc_dense: run `python -m lrc_dist.demo --out {demo} --beyond` first")
    teacher = root / "teacher" / f"export_{p['teacher_steps']:08d}" / "hf"
    rows = [("LRC (demo)", results["lrc"]), ("lrc_dense: dense_after 0.5, dense_lr_scale 1 (demo)", results["lrc_dense"]),
            ("lrc_dense_activation: activation init, dense_lr_scale 1 (demo)", results["lrc_dense_activation"])]
    for name, overrides in VARIANTS.items():
        words = only.split(",") if isinstance(only, str) else list(only)  # fire reads a,b as a tuple
        if only and not any(word in name for word in words):
            continue
        export = run_training(root / "dense_sweep" / name.replace(" ", "_"), p, p["student_steps"], p["student_lr"], {
            "data.paths": [str(root / "tokens" / "train")], "model.teacher": str(teacher),
            "model.lrc.student_hidden_size": p["width"] // 2, **overrides})
        rows.append((name, perplexity(str(export), str(root / "tokens" / "held_out"), seq_len=p["seq_len"],
                                      max_windows=p["eval_windows"], progress=False, rank_windows=RANK_WINDOWS)))
    print("| student | held-out perplexity | effective rank |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['perplexity']:.2f} | {r['effective_rank']:.1f} |")


if __name__ == "__main__":
    fire.Fire(main)

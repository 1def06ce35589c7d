"""Why LRC across tokenizers trails KD across tokenizers at demo scale, and on-policy distillation
across tokenizers: the demo's `lrc_xtok` (Whisper's tokenizer for the student, random init) or
`kd_xtok` with one setting changed, on a finished demo's teacher and data, at the demo's token
budget, in held-out bits per byte.

    .venv/bin/python -m lrc_dist.demo --out runs/demo --cross_tokenizer    # first: the demo's students
    .venv/bin/python bench/cross_tokenizer_sweep.py --demo runs/demo        # then this (~9 min per student on 2 cores)

Each variant trains into DEMO/cross_tokenizer_sweep/NAME (a finished one is reused) and prints its
held-out bits per byte (every window of the split) and effective rank beside the demo's LRC, KD and
cross-tokenizer students, read from the demo's results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from lrc_dist.demo import PRESETS, RANK_WINDOWS, STUDENT_TOKENIZER, run_training
from lrc_dist.evaluate import perplexity

VARIANTS = {
    # do the clone terms, whose targets a student reading other tokens can't reach, cost it?
    "no clone loss": {"loss.clone_weight": 0.0},
    # do the fixed rows of the student's vocabulary cost it? The dense phase frees them.
    "dense second half": {"model.lrc.dense_after": 0.5},
    # on-policy across tokenizers: half of the windows continued for their last quarter, as the demo's --on_policy
    "on-policy half": {"loss.on_policy_ratio": 0.5, "loss.on_policy_new_tokens": "QUARTER"},
    "kd_xtok, on-policy half": {"model.method": "kd", "model.student": "KD_STUDENT", "loss.on_policy_ratio": 0.5,
                                "loss.on_policy_new_tokens": "QUARTER"},
}
DEMO_ROWS = {"lrc": "LRC, teacher's tokenizer (demo)", "kd": "plain KD, teacher's tokenizer (demo)",
             "lrc_xtok": "lrc_xtok: LRC, Whisper tokenizer (demo)",
             "lrc_xtok_activation": "lrc_xtok_activation: activation init (demo)",
             "kd_xtok": "kd_xtok: plain KD, Whisper tokenizer (demo)"}


def main(demo: str = "runs/demo", preset: str = "default", only: str = "") -> None:
    """The table of VARIANTS (`only`: those whose names contain one of these comma-separated words)."""
    root, p = Path(demo), PRESETS[preset]
    results = json.loads((root / "results.json").read_text())
    if "lrc_xtok" not in results:
        raise SystemExit(f"{root / 'results.json'} has no lrc_xtok: run `python -m lrc_dist.demo --out {demo} "
                         f"--cross_tokenizer` first")
    teacher = root / "teacher" / f"export_{p['teacher_steps']:08d}" / "hf"
    held_out = root / "tokens_whisper" / "held_out"
    rows = [(label, results[name]) for name, label in DEMO_ROWS.items()]
    placeholders = {"QUARTER": p["seq_len"] // 4, "KD_STUDENT": str(root / "kd_xtok_init")}
    for name, overrides in VARIANTS.items():
        words = only.split(",") if isinstance(only, str) else list(only)  # fire reads a,b as a tuple
        if only and not any(word in name for word in words):
            continue
        export = run_training(root / "cross_tokenizer_sweep" / name.replace(" ", "_"), p, p["student_steps"],
                              p["student_lr"], {
                                  "data.paths": [str(root / "tokens_whisper" / "train")], "model.teacher": str(teacher),
                                  "model.student": str(STUDENT_TOKENIZER),
                                  "model.lrc.student_hidden_size": p["width"] // 2,
                                  **{k: placeholders.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}})
        ranked = perplexity(str(export), str(held_out), seq_len=p["seq_len"], max_windows=p["eval_windows"],
                            progress=False, rank_windows=RANK_WINDOWS)
        every = perplexity(str(export), str(held_out), seq_len=p["seq_len"], progress=False)
        rows.append((name if name.startswith("kd_") else f"lrc_xtok, {name}",
                     {**ranked, "bits_per_byte": every["bits_per_byte"]}))
    print("| student | held-out bits/byte | effective rank |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['bits_per_byte']:.4f} | {r['effective_rank']:.1f} |")


if __name__ == "__main__":
    fire.Fire(main)

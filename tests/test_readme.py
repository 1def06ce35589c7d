"""The README runs: every command of its command blocks is executed, on tiny stand-ins.

The teacher, the token sets and the exports are the quick demo's. Shapes shrink to tiny ones,
and sbatch runs as the job script's dry run, with scontrol stubbed. Each substitution is listed
in the table below. A command this file does not know fails the test, so a new or changed
README command cannot go untested. Only six commands are skipped (set-up, the two test runs, the
two pip installs, the hour-long real-teacher demo), each for a stated reason.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from lrc_dist.config import parse_args
from test_train import ENV, REPO

SKIPPED = {  # command prefix: why it is not run here
    "./setup.sh": "CI's first step (.ci/run) runs it on a clean clone",
    ".venv/bin/python -m pytest": "the test suite itself",
    "pip install": "installs packages; CI's set-up installs the same extra",
    ".venv/bin/pip install": "installs the real extra; the tests that need it skip without it",
    ".venv/bin/python -m lrc_dist.demo --preset real": "about an hour on 2 cores; test_demo.py's "
                                                       "test_real_preset_end_to_end runs it at 2 steps (slow)",
}
NOT_COMMANDS = ("L = LM(student)",)  # indented blocks that are formulas, not commands
TINY = ["--model.lrc.student_hidden_size=32", "--data.seq_len=32", "--micro_batch_size=1", "--global_batch_size=4",
        "--steps=4", "--checkpoint.interval=2", "--model.dtype=float32", "--parallel.param_dtype=float32",
        "--log.wandb_project=null"]


def commands() -> list[tuple[int, str]]:
    """(line, command) of every command of the README's indented code blocks, continuation lines
    joined, in order."""
    lines, found, start, current = (REPO / "README.md").read_text().splitlines(), [], None, ""
    in_block = False
    for n, line in enumerate(lines, 1):
        starts = not lines[n - 2].strip() and not line.lstrip().startswith(("- ", "| "))  # not a list's text
        if line.startswith("    ") and (in_block or starts):
            in_block = True
            text = line.strip()
            if not text or (text.startswith("#") and not current):
                continue
            start = start or n
            current += " " + text
            if current.endswith("\\"):
                current = current[:-1]
                continue
            found.append((start, current.strip()))
            start, current = None, ""
        elif line.strip():
            in_block = False
    return found


def test_the_readme_commands_are_all_known():
    for line, command in commands():
        known = any(command.startswith(p) for p in (*SKIPPED, *NOT_COMMANDS, *HANDLERS))
        assert known, f"README.md:{line}: a command this test does not run: {command}"


@pytest.fixture(scope="module")
def world(quick_demo, tmp_path_factory):
    """The stand-ins the README's placeholders become."""
    demo, _ = quick_demo
    root = tmp_path_factory.mktemp("readme")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "raw/fineweb").mkdir(parents=True)
    texts = [f"document {i} of a tiny web corpus about models and students" for i in range(40)]
    pq.write_table(pa.table({"text": texts}), root / "raw/fineweb/part-0.parquet")
    chats = [{"conversations": [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."}]}
             for i in range(20)]
    (root / "openhermes2_5.json").write_text(json.dumps(chats))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho localhost\n')
    (bin_dir / "scontrol").chmod(0o755)
    w = {"demo": demo, "root": root, "teacher": demo / "teacher/export_00000040/hf",
         "tokens": demo / "tokens/train", "held_out": demo / "tokens/held_out", "student": demo / "lrc/export_00000020/hf",
         "bin": bin_dir, "run": root / "runs/lrc_qwen7b_one_process"}
    run([sys.executable, "-m", "lrc_dist.train", "configs/lrc_qwen7b.yaml", f"--model.teacher={w['teacher']}",
         f"--data.paths=[{w['tokens']}]", "--parallel.backend=none", *TINY, f"--checkpoint.dir={w['run']}"], w)
    return w


def run(argv: list[str], w: dict, **env) -> str:
    proc = subprocess.run(argv, cwd=REPO, env={**ENV, "WANDB_MODE": "disabled", **env}, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def substitute(command: str, table: list[tuple[str, str]]) -> list[str]:
    for pattern, replacement in table:
        command = re.sub(pattern, replacement, command)
    return [a if not a.startswith(".venv/bin/python") else sys.executable for a in shlex.split(command, comments=True)]


def paths(w: dict) -> list[tuple[str, str]]:
    """Placeholders of the training and evaluation commands -> the demo's teacher, data, student."""
    return [(r"/models/Qwen2\.5-7B-Instruct", str(w["teacher"])), (r"/data/tokens/fineweb_edu", str(w["tokens"])),
            (r"runs/demo_quick/teacher/export_00000040/hf", str(w["teacher"])),
            (r"runs/demo_quick/tokens/train", str(w["tokens"])), (r"(?<![\w/])out/", f"{w['root']}/out/"),
            (r"(?<![\w/])runs/", f"{w['root']}/runs/")]  # outputs go to the test's directory, not the clone


def demo(command: str, w: dict) -> None:
    argv = substitute(command, paths(w))
    if "--preset" not in argv:  # the default preset takes 11 minutes: the quick one, into its finished run
        argv += ["--preset", "quick", "--dskd"]
    if "--out" not in argv:
        argv += ["--out", str(w["demo"])]
    argv[argv.index("--out") + 1] = str(w["demo"])  # every demo line reuses the one finished quick run
    assert "reused" in run(argv + ["--plot", "False"], w)


def tokenize(command: str, w: dict) -> None:
    table = [(r"/models/Qwen2\.5-7B-Instruct", str(REPO / "assets/tokenizers/gpt2")),  # a tokenizer with a chat template
             (r"(?<![\w/])tokens/", f"{w['root']}/tokens/"), (r"'raw/", f"'{w['root']}/raw/"),
             (r"\bopenhermes2_5\.json", str(w["root"] / "openhermes2_5.json"))]
    run(substitute(command, table), w)


def train(command: str, w: dict) -> None:
    argv = substitute(command, paths(w))
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *(a if not a.startswith("--nproc_per_node") else
                                                                   "--nproc_per_node=2" for a in argv[1:])]
    recipe = next(a for a in argv if a.endswith(".yaml"))
    extra = [] if "tiny_cpu" in recipe else [*TINY, f"--checkpoint.dir={w['root']}/runs/lrc_qwen7b"]
    if not any(a.startswith("--model.teacher") for a in argv):  # "the same with DeepSpeed": same teacher and data
        extra += [f"--model.teacher={w['teacher']}", f"--data.paths=[{w['tokens']}]"]
        extra += [f"--checkpoint.dir={w['root']}/runs/lrc_qwen7b_ds"]
    run(argv + extra, w)


def slurm(command: str, w: dict) -> None:
    """sbatch SCRIPT ARGS and DRY_RUN=1 bash SCRIPT: the script's dry run in a stubbed allocation;
    the training command it prints must parse (with the tiny stand-ins for DIR and TOKENS)."""
    argv = substitute(command, [(r"^DRY_RUN=1 bash", "bash"), (r"^sbatch\s+(--\S+\s+)*", "bash "),
                                (r"=DIR\b", f"={w['teacher']}"), (r"\[TOKENS\]", f"[{w['tokens']}]")])
    env = {"PATH": f"{w['bin']}:{os.environ['PATH']}", "DRY_RUN": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": "python3"}
    printed = shlex.split(run(argv, w, **env))
    train_args = printed[printed.index("lrc_dist.train") + 1:]
    parse_args([str(REPO / train_args[0]), *train_args[1:]])


def evaluate(command: str, w: dict) -> None:
    table = [*paths(w)[:4], (r"out/lrc-4b", str(w["student"])), (r"tokens/held_out", str(w["held_out"])),
             (r"--seq_len 2048 --max_windows 500", "--seq_len 64 --max_windows 4"),
             (r"--device cuda --dtype bfloat16", "--device cpu --dtype float32"),
             (r"--tasks \S+", "--tasks pydoc_cloze"), (r"--output eval\.json", f"--output {w['root']}/eval.json")]
    run(substitute(command, table), w)


def export(command: str, w: dict) -> None:
    run_dir = w["run"]  # a tiny run of the README's recipe (its torchrun line is a slow test of its own)
    table = [(r"runs/lrc_qwen7b/step_00120000", str(run_dir / "step_00000004")),
             (r"runs/lrc_qwen7b/export_00020000/lrc", str(run_dir / "export_00000004/lrc")),
             (r"(?<![\w/])runs/lrc_qwen7b", str(run_dir)), (r"(?<![\w/])out/", f"{w['root']}/out/")]
    run(substitute(command, table), w)


def plan(command: str, w: dict) -> None:
    """The recipes' plans at their real shapes (each about a minute: a slow test)."""
    out = run(substitute(command, []), w)
    assert '"recommended"' in out if "--json" in command else "recommended:" in out, out[-2000:]


HANDLERS = {
    ".venv/bin/python -m lrc_dist.demo": demo,
    ".venv/bin/python data_prep/tokenize.py": tokenize,
    "torchrun ": train,
    ".venv/bin/python -m lrc_dist.train": train,
    "sbatch ": slurm,
    "DRY_RUN=1 bash slurm/": slurm,
    ".venv/bin/python -m lrc_dist.evaluate": evaluate,
    ".venv/bin/python -m lrc_dist.export": export,
    ".venv/bin/python -m lrc_dist.plan": plan,
}


# multi-process, lm-eval's start-up, or a plan at a real shape
SLOW = ("torchrun ", ".venv/bin/python -m lrc_dist.evaluate harness", ".venv/bin/python -m lrc_dist.plan")


def cases():
    for line, command in commands():
        if command.startswith(NOT_COMMANDS):
            continue
        if command.startswith(tuple(SKIPPED)):
            reason = next(why for prefix, why in SKIPPED.items() if command.startswith(prefix))
            yield pytest.param(line, command, marks=pytest.mark.skip(reason=reason), id=f"line{line}")
        else:
            marks = [pytest.mark.slow] if command.startswith(SLOW) else []
            yield pytest.param(line, command, marks=marks, id=f"line{line}")


@pytest.mark.parametrize("line, command", list(cases()))
def test_a_readme_command_runs(world, line, command):
    handler = next(h for prefix, h in HANDLERS.items() if command.startswith(prefix))
    try:
        handler(command, world)
    except AssertionError as e:
        raise AssertionError(f"README.md:{line}: {command}\n{e}") from None


def test_the_readme_has_its_commands():
    assert sum(1 for _ in cases()) >= 20 and sum(c.startswith(tuple(SKIPPED)) for _, c in commands()) == 6

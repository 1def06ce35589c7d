"""This tree's training step against another revision's, measured by the same bench in one run.

    .venv/bin/python bench/versus.py c28a957 --rounds 2 -- --shape reference --sides lrc --allocator product

Checks the revision out into a git worktree (under /tmp, reused), then runs this tree's
bench/step_bench.py alternately on that revision's lrc_dist and on this one's (PYTHONPATH), one
process per run, `rounds` times each, with the arguments after `--`. Prints each side's median
step time and process peak memory, and the ratios baseline / this tree. The bench uses only what
both trees have; `--allocator product` runs what each tree's trainer does.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import argparse

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = {"LRC": r"^LRC step\s+([\d.]+) ms", "dense": r"^dense step\s+([\d.]+) ms",
            "peak MiB": r"^peak resident memory of the process \(\w+\): (\d+) MiB"}


def worktree(rev: str) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    path = Path(f"/tmp/lrc_dist_versus_{sha}")
    if not (path / "lrc_dist").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), sha], check=True,
                       capture_output=True)
    return path


def run(tree: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step_bench.py"), *args], capture_output=True,
                          text=True, env=env, cwd="/tmp")
    if proc.returncode:
        raise SystemExit(f"step_bench on {tree} failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout, end="", flush=True)
    found = {}
    for key, pattern in PATTERNS.items():
        match = re.search(pattern, proc.stdout, re.MULTILINE)
        if match:
            found[key] = float(match.group(1))
    return found


def main(baseline: str, bench_args: list[str], rounds: int = 2):
    trees = {f"baseline {baseline}": worktree(baseline), "this tree": ROOT}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            print(f"--- round {r + 1}/{rounds}: {name} ({tree})", flush=True)
            results[name].append(run(tree, [str(a) for a in bench_args]))
    print("\n| tree | " + " | ".join(PATTERNS) + " |\n|---|" + "---|" * len(PATTERNS))
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(run[k] for run in runs) for k in PATTERNS if all(k in run for run in runs)}
        print(f"| {name} | " + " | ".join(f"{medians[name].get(k, float('nan')):.0f}" for k in PATTERNS) + " |")
    base, new = medians.values()
    for key in PATTERNS:
        if key in base and key in new:
            print(f"{key}: baseline / this tree = {base[key] / new[key]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="a git revision (commit, tag, branch) of this repository")
    parser.add_argument("--rounds", type=int, default=2, help="runs per tree, alternating (default 2)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    parser.epilog = "Arguments after -- go to bench/step_bench.py."
    args = parser.parse_args(argv[:cut])
    main(args.baseline, argv[cut + 1:], args.rounds)

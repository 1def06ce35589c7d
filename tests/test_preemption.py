"""Preemption as a cluster delivers it, with real processes: a signal at a random step to a lone
process, to torchrun or to one rank loses no step and the resumed run gives the uninterrupted
curve, for every backend; the Slurm cycle (signal -> checkpoint -> requeue -> resume) with stub
srun/scontrol; ranks whose launcher is killed stop with a checkpoint; a second job on a live run
dir is refused; and any checkpoint exports on one process."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_curve, free_port
from test_train import CURVE_KEYS, ENV, REPO, TINY, run

LONG = ("--steps=24", "--checkpoint.interval=1000")  # no periodic checkpoint: only the signal's and the last


def start(job, run_dir, nproc, *overrides, log=None) -> subprocess.Popen:
    """The tiny job in the background (under torchrun when nproc > 1), output to `log` (run_dir.log)."""
    teacher, tokens = job
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "lrc_dist.train", TINY, f"--model.teacher={teacher}", f"--data.paths=[{tokens}]",
           f"--checkpoint.dir={run_dir}", *overrides]
    with open(log or f"{run_dir}.log", "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env={**ENV, "WANDB_DIR": str(run_dir)}, stdout=out,
                                stderr=subprocess.STDOUT)


def logged_steps(run_dir) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(logged_steps(run_dir)) < step:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}: " + output(run_dir)
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s: " + output(run_dir)
        time.sleep(0.02)


def output(run_dir) -> str:
    return Path(f"{run_dir}.log").read_text()[-4000:]


def ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's worker processes by RANK."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "lrc_dist.train" in " ".join(child.cmdline()):
            found[int(env["RANK"])] = child
    return found


def assert_nothing_lost(run_dir, preempted_at: int) -> int:
    """The run stopped at or after the signal's step, and its checkpoint is its last logged step."""
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)) and preempted_at <= steps[-1] < 24, steps
    assert (Path(run_dir) / "latest").read_text() == f"step_{steps[-1]:08d}", "steps were lost"
    return steps[-1]


@pytest.fixture(scope="module")
def long_reference(tiny_job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("long_reference")
    return run(tiny_job, run_dir, 1, "--parallel.backend=none", *LONG)


# The one-process variant is slow-marked (CI time): under torchrun each rank gets the same SIGTERM
# and runs the same handler.
@pytest.mark.parametrize("backend, nproc, target", [
    pytest.param("none", 1, "the process", marks=pytest.mark.slow),
    ("fsdp", 2, "torchrun"),
    pytest.param("deepspeed", 2, "rank 1 alone", marks=pytest.mark.slow),
])
def test_sigterm_at_a_random_step_loses_no_step(long_reference, tiny_job, tmp_path, backend, nproc, target):
    at = random.randint(2, 8)
    run_dir = tmp_path / "run"
    proc = start(tiny_job, run_dir, nproc, f"--parallel.backend={backend}", *LONG)
    wait_for_step(run_dir, at, proc)
    victim = ranks(proc)[1].pid if target == "rank 1 alone" else proc.pid
    os.kill(victim, signal.SIGTERM)
    proc.wait(timeout=120)
    stopped = assert_nothing_lost(run_dir, at)
    log = output(run_dir)
    assert f"preempted: stopped on SIGTERM after step {stopped}" in log, log
    if nproc == 1:
        assert proc.returncode == 75, log  # EXIT_PREEMPTED
    else:
        assert proc.returncode != 0  # torchrun's own convention after a signal or a failed rank
    resumed = run(tiny_job, run_dir, nproc, f"--parallel.backend={backend}", *LONG)
    assert_same_curve(resumed, long_reference, CURVE_KEYS)  # every step once, as uninterrupted (signal at {at})

    # Export any checkpoint on one process, without torchrun: the run's final one equals its own export.
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "lrc_dist.export", str(run_dir), str(out), "--dtype", "float32"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(run_dir / "export_00000024/hf/model.safetensors")
    got = load_file(out / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    card = (out / "README.md").read_text()
    assert "| steps | 24 of 24 |" in card and "| tokens seen | 3,072 |" in card and "Loss terms" in card


SRUN_STUB = """#!{python}
# srun, as far as the job scripts meet it: its options dropped, the command run as its one task;
# SIGUSR1 passed on to the task, SIGTERM answered by SIGKILL of the whole step, as real srun does.
import signal, subprocess, sys
import psutil

args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
task = subprocess.Popen(args)

def kill_step(*_):
    for p in [*psutil.Process(task.pid).children(recursive=True), task]:
        p.kill()

signal.signal(signal.SIGUSR1, lambda *_: task.send_signal(signal.SIGUSR1))
signal.signal(signal.SIGTERM, kill_step)
sys.exit(task.wait())
"""


@pytest.fixture
def slurm(tiny_job, tmp_path):
    """slurm/tiny_cpu.sh as Slurm runs it, with srun (SRUN_STUB) and scontrol stubbed: returns
    (the batch command, its env, the run dir, the file of requeued job ids)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(SRUN_STUB.format(python=sys.executable))
    (stubs / "scontrol").write_text('#!/usr/bin/env bash\ncase $1 in\n  show) echo localhost ;;\n'
                                    '  requeue) echo "$2" >> "$REQUEUED" ;;\nesac\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    teacher, tokens = tiny_job
    run_dir = tmp_path / "run"
    env = {**ENV, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "1", "PYTHON": sys.executable,
           "MASTER_PORT": str(free_port()), "REQUEUED": str(tmp_path / "requeued"), "WANDB_DIR": str(run_dir)}
    cmd = ["bash", str(REPO / "slurm/tiny_cpu.sh"), f"--model.teacher={teacher}", f"--data.paths=[{tokens}]",
           f"--checkpoint.dir={run_dir}", "--parallel.backend=fsdp", *LONG]
    return cmd, env, run_dir, tmp_path / "requeued"


def batch_job(slurm, signum: int, tmp_path) -> tuple[int, str, int]:
    """Run the batch script, signal its shell at a random step as Slurm would: (status, output, step)."""
    cmd, env, run_dir, _ = slurm
    at = random.randint(2, 8)
    with open(tmp_path / "job.out", "w") as log:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_step(run_dir, at, job)
        os.kill(job.pid, signum)
        status = job.wait(timeout=120)
    return status, (tmp_path / "job.out").read_text(), at


def requeues(slurm) -> list[str]:
    return slurm[3].read_text().split() if slurm[3].is_file() else []


def test_slurm_cycle_signal_checkpoint_requeue_resume(long_reference, slurm, tmp_path):
    """SIGUSR1 to the batch shell (--signal=B:USR1@300) reaches the ranks through srun and torchrun,
    they checkpoint, the script requeues the job, and the requeued job (same id) resumes to the
    uninterrupted curve."""
    cmd, env, run_dir, _ = slurm
    status, out, at = batch_job(slurm, signal.SIGUSR1, tmp_path)
    assert status == 0 and requeues(slurm) == ["4242"], out[-3000:]
    stopped = assert_nothing_lost(run_dir, at)
    assert f"preempted: stopped on SIGUSR1 after step {stopped}" in out
    requeued = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stdout[-3000:]
    assert requeues(slurm) == ["4242"], "a job that finished must not requeue"
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert_same_curve(records, long_reference, CURVE_KEYS)


@pytest.mark.slow
def test_slurm_sigterm_to_the_batch_shell_checkpoints_and_stops(slurm, tmp_path):
    """`scancel --batch --signal=TERM`: checkpoint, no requeue; srun would kill the ranks at once
    on a SIGTERM of its own, so the script must pass SIGUSR1 on."""
    status, out, at = batch_job(slurm, signal.SIGTERM, tmp_path)
    stopped = assert_nothing_lost(slurm[2], at)
    assert f"preempted: stopped on SIGUSR1 after step {stopped}" in out, out[-3000:]
    assert status != 0 and requeues(slurm) == [] and "training exited 75" in out


def test_ranks_stop_with_a_checkpoint_when_torchrun_is_killed_and_a_second_job_is_refused(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(tiny_job, run_dir, 2, "--parallel.backend=fsdp", "--steps=10000", "--checkpoint.interval=10000")
    wait_for_step(run_dir, 3, proc)
    workers = ranks(proc)
    assert sorted(workers) == [0, 1]

    second = run_dir.with_name("second")
    refused = start(tiny_job, run_dir, 1, "--parallel.backend=none", log=f"{second}.log")
    assert refused.wait(timeout=120) == 69
    assert f"in use by another job: pid {workers[0].pid} on {socket.gethostname()}" in output(second)

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(list(workers.values()), timeout=60)
    assert not alive, "ranks outlived their launcher"
    steps = logged_steps(run_dir)
    assert (run_dir / "latest").read_text() == f"step_{steps[-1]:08d}"
    assert f"preempted: stopped on SIGTERM after step {steps[-1]}" in output(run_dir)
    assert not (run_dir / "lock").exists()


@pytest.mark.slow
def test_a_zero_checkpoint_on_another_world_size_is_refused_up_front(tiny_job, tmp_path):
    run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed", "--stop_at=2")
    teacher, tokens = tiny_job
    proc = subprocess.run([sys.executable, "-m", "lrc_dist.train", TINY, f"--model.teacher={teacher}",
                           f"--data.paths=[{tokens}]", f"--checkpoint.dir={tmp_path}", "--parallel.backend=deepspeed"],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ZeRO checkpoint of 2 ranks and this run has 1" in proc.stderr and "Resume on 2 ranks" in proc.stderr

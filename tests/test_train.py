"""The trainer end to end on CPU with gloo: every backend gives the single-process loss curve,
resume (also onto another world size) continues it exactly, and the student exports."""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_curve
from export_reference import assert_export_as_from_disk
from lrc_dist.checkpoint import Checkpointer
from lrc_dist.config import ConfigError, load_config
from lrc_dist.parallel import deepspeed_config
from lrc_dist.train import NonFiniteLossError, lr_at, train

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny_cpu.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}


def run(job, run_dir, nproc=1, *overrides, entry=("-m", "lrc_dist.train"), env=None) -> list[dict]:
    """Train the tiny job (under torchrun when nproc > 1); returns the run's metrics records."""
    teacher, tokens = job
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd = [*launcher, *entry, TINY, f"--model.teacher={teacher}", f"--data.paths=[{tokens}]",
           f"--checkpoint.dir={run_dir}", *overrides]
    env = {**ENV, "WANDB_DIR": str(run_dir), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


CURVE_KEYS = ("loss", "lm", "kl", "clone", "clone/ffn_out", "grad_norm")


@pytest.fixture(scope="module")
def reference(tiny_job, tmp_path_factory):
    """One plain process, no sharding: the curve every backend must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run(tiny_job, run_dir, 1, "--parallel.backend=none", "--log.wandb_project=lrc_test"), run_dir


def test_reference_run_learns_exports_and_logs(reference, tiny_job, tmp_path):
    records, run_dir = reference
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert {"lm", "kl", "clone", "clone/q", "grad_norm", "lr", "tokens_per_s_per_device", "memory_gb"} <= set(records[0])
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "export_00000006/hf")
    assert hf.config.hidden_size == 32
    assert (run_dir / "export_00000006/hf/tokenizer.json").is_file()
    assert_export_as_from_disk(run_dir, 6, tmp_path)
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert (run_dir / "latest").read_text().strip() == "step_00000006"


def test_fsdp_two_ranks_and_resume_on_one_rank(reference, tiny_job, tmp_path):
    """FSDP2 with a sharded teacher and sharded weight generation on 2 ranks, stopped at step 3 (and
    exported there), resumed on 1 rank (replicated teacher): the loss curve is the single-process
    one throughout."""
    first = run(tiny_job, tmp_path, 2, "--parallel.backend=fsdp", "--parallel.teacher=shard", "--stop_at=3",
                "--parallel.shard_generation=true", "--checkpoint.export_interval=3")
    assert_export_as_from_disk(tmp_path, 3, tmp_path / "scratch")
    saved = set(_dcp_keys(tmp_path / "step_00000003"))
    assert saved and not any("teacher" in k for k in saved), "teacher weights must never be checkpointed"
    resumed = run(tiny_job, tmp_path, 1, "--parallel.backend=fsdp", "--parallel.teacher=replicate")
    assert_same_curve(resumed, reference[0], CURVE_KEYS)
    assert len(first) == 3


@pytest.mark.slow
def test_compiled_blocks_under_fsdp_give_the_one_process_curve(reference, tiny_job, tmp_path):
    """parallel.compile composed with FSDP2 (2 ranks, teacher sharded with its blocks, activation
    checkpointing): inductor on each rank, the single-process eager curve to fp32 rounding; the
    checkpoint keeps the eager names (no _orig_mod)."""
    records = run(tiny_job, tmp_path, 2, "--parallel.backend=fsdp", "--parallel.teacher=shard",
                  "--parallel.compile=true", "--stop_at=3")
    assert_same_curve(records, reference[0][:3], CURVE_KEYS, rel=1e-4)
    keys = set(_dcp_keys(tmp_path / "step_00000003"))
    assert keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow
def test_compiled_blocks_under_zero3_give_the_one_process_curve(reference, tiny_job, tmp_path):
    """parallel.compile composed with DeepSpeed ZeRO-3 (2 ranks, each block a leaf module that ZeRO
    gathers whole, sharded generation): the one-process eager curve to fp32 rounding; ZeRO's
    checkpoint keeps the eager parameter names."""
    records = run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed", "--parallel.compile=true",
                  "--parallel.shard_generation=true", "--stop_at=3")
    assert_same_curve(records, reference[0][:3], CURVE_KEYS, rel=1e-4)
    states = torch.load(tmp_path / "step_00000003/state/zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    names = set(states["param_shapes"][0]) | set(states["module"])  # ZeRO's names and the module's
    assert names and not any("_orig_mod" in k for k in names), sorted(names)[:5]


def _dcp_keys(path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()


def test_deepspeed_zero3_curve_and_resume(reference, tiny_job, tmp_path):
    """ZeRO-3 on 2 ranks, stopped at step 3 and resumed: the one-process curve. On a CPU DeepSpeed
    builds no extension (its shared-memory all-reduce, a minute of C++ compilation, serves only its
    inference)."""
    extensions = tmp_path / "torch_extensions"
    run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed", "--stop_at=3", "--parallel.shard_generation=true",
        env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert not extensions.exists(), sorted(p.name for p in extensions.iterdir())
    states = torch.load(tmp_path / "step_00000003/state/zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert not any("teacher" in k for k in states["module"] or {}), "teacher weights must never be checkpointed"
    assert_same_curve(run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed"), reference[0], CURVE_KEYS)
    assert_export_as_from_disk(tmp_path, 6, tmp_path / "scratch")


def test_deepspeed_zero2_curve(reference, tiny_job, tmp_path):
    records = run(tiny_job, tmp_path, 2, "--parallel.backend=deepspeed",
                  "--parallel.deepspeed_config=ds_configs/zero2.json", "--checkpoint.export_interval=3")
    assert_same_curve(records, reference[0], CURVE_KEYS)
    for step in (3, 6):  # a periodic export and the final one
        assert_export_as_from_disk(tmp_path, step, tmp_path / "scratch")


POISONED_TRAIN = """
import os
from lrc_dist.lrc import LowRankClone
from lrc_dist.train import main

forward, calls = LowRankClone.forward, []

def poisoned(self, *args, **kwargs):  # NaN loss on forward call POISON_CALL of rank POISON_RANK
    loss, metrics = forward(self, *args, **kwargs)
    calls.append(1)
    hit = len(calls) == int(os.environ["POISON_CALL"]) and os.environ["RANK"] == os.environ["POISON_RANK"]
    return (loss * float("nan"), metrics) if hit else (loss, metrics)

LowRankClone.forward = poisoned
main()
"""


@pytest.mark.parametrize("zero, sequences, one_call, rank_call", [
    ("zero3", 4, 3, 2),  # step 2 = call 3 of one process (2 micro-batches per step), call 2 of each rank
    # 2 micro-batches per rank: a finite one follows the NaN one before the boundary (slow: ~25 s)
    pytest.param("zero2", 8, 5, 3, marks=pytest.mark.slow),
])
def test_deepspeed_skips_a_nan_step_like_one_process(tiny_job, tmp_path, zero, sequences, one_call, rank_call):
    """A NaN on one rank only: every rank skips that step, and ZeRO leaves weights and Adam state as
    they were, so the rest of the curve is the one-process run's with the same step skipped."""
    script = tmp_path / "poisoned_train.py"
    script.write_text(POISONED_TRAIN)
    batch = f"--global_batch_size={sequences}"
    want = run(tiny_job, tmp_path / "one", 1, "--parallel.backend=none", batch, entry=(str(script),),
               env={"POISON_CALL": str(one_call), "POISON_RANK": "0"})
    got = run(tiny_job, tmp_path / "ds", 2, "--parallel.backend=deepspeed", f"--parallel.deepspeed_config=ds_configs/{zero}.json",
              batch, entry=(str(script),), env={"POISON_CALL": str(rank_call), "POISON_RANK": "1"})
    assert [r["skipped_steps"] for r in got] == [r["skipped_steps"] for r in want] == [0, 1, 0, 0, 0, 0]
    assert_same_curve(got, want, ("loss", "lm", "kl", "clone", "grad_norm"), nan_ok=True)


# ---- in-process: non-finite losses, schedule, checkpoint mechanics ------------------------------


def tiny_cfg(job, run_dir, **overrides):
    teacher, tokens = job
    return load_config(TINY, {"model.teacher": teacher, "data.paths": [tokens], "checkpoint.dir": str(run_dir),
                              "checkpoint.export_interval": 0, **overrides})


def nan_on_steps(monkeypatch, bad_calls: set[int] | None):
    """Make the model's loss NaN on the given forward calls (all when None)."""
    from lrc_dist.lrc import LowRankClone

    forward, calls = LowRankClone.forward, []

    def poisoned(self, *args, **kwargs):
        loss, metrics = forward(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), metrics) if bad_calls is None or len(calls) in bad_calls else (loss, metrics)

    monkeypatch.setattr(LowRankClone, "forward", poisoned)


def test_nan_step_is_skipped_and_counted(one_process, tiny_job, tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, {3})  # the first micro-batch of step 2 (two micro-batches per step)
    kept = []
    monkeypatch.setattr("lrc_dist.train.keep_freed_cpu_memory", lambda: kept.append(True))
    train(tiny_cfg(tiny_job, tmp_path))
    assert kept == [True]  # on a CPU the trainer keeps freed memory (the allocator trap, test_losses.py)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0, 0, 0]
    losses = torch.tensor([r["loss"] for r in records])  # a log interval of skipped steps only has no mean
    assert losses[1].isnan() and losses[[0, 2, 3, 4, 5]].isfinite().all()


def test_persistent_nan_aborts_with_clear_message(one_process, tiny_job, tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, None)
    with pytest.raises(NonFiniteLossError, match="2 consecutive bad steps .*; aborting. Lower optim.lr.*start afresh"):
        train(tiny_cfg(tiny_job, tmp_path, max_bad_steps=2))


def test_lr_schedules(tiny_job, tmp_path):
    cfg = tiny_cfg(tiny_job, tmp_path, steps=100, **{"optim.warmup": 10, "optim.lr": 1.0})
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1 / 90) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    cfg.optim.schedule, cfg.optim.min_lr_ratio = "cosine", 0.1
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.55)


class FakeBackend:
    def save(self, path):
        (path / "weights").write_text("w")


def test_checkpoints_are_atomic_and_pruned(one_process, tmp_path):
    torch.distributed.init_process_group("gloo")
    ckpt = Checkpointer(tmp_path, keep=2, is_main=True)
    assert ckpt.latest() is None
    (tmp_path / "step_00000009.tmp").mkdir()  # debris of a crash mid-save: never "latest"
    for step in (1, 2, 3):
        ckpt.save(step, FakeBackend(), {"step": step})
    assert ckpt.latest() == ckpt.resumable() == tmp_path / "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*") if not p.name.endswith(".tmp")) == ["step_00000002", "step_00000003"]


def test_config_errors(tiny_job, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key optim.lrr \(.*tiny_cpu.yaml and its overrides\)"):
        tiny_cfg(tiny_job, tmp_path, **{"optim.lrr": 1})
    with pytest.raises(ConfigError, match="config configs/nope.yaml does not exist"):
        load_config("configs/nope.yaml")
    (tmp_path / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    with pytest.raises(ValueError, match="needs zero_optimization.stage >= 1"):
        deepspeed_config(tiny_cfg(tiny_job, tmp_path, **{"parallel.deepspeed_config": str(tmp_path / "zero0.json")}), 1)


# ---- Slurm launchers -----------------------------------------------------------------------------


RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_slurm_dry_run_prints_torchrun_command(recipe, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\nprintf "gpu-a01\\ngpu-a02\\ngpu-a03\\n"\n')
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu-a[01-03]",
           "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "8", "PYTHON": "python3",
           "SLURM_CPUS_PER_TASK": "64"}
    script = REPO / "slurm" / f"{recipe}.sh"  # every recipe has its Slurm script
    out = subprocess.run(["bash", str(script), "--optim.lr=2e-4"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == ("srun --ntasks-per-node=1 --nodes=3 --kill-on-bad-exit=1 --cpus-per-task=64 python3 "
                   "-m torch.distributed.run --nnodes=3 --nproc_per_node=8 --rdzv_backend=c10d "
                   "--rdzv_endpoint=gpu-a01:29500 --rdzv_id=42 "
                   "--signals-to-handle=SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1 "  # printf %q quotes commas
                   f"--shutdown-timeout={240 if recipe != 'tiny_cpu' else 100} "
                   f"-m lrc_dist.train configs/{recipe}.yaml --optim.lr=2e-4")
    load_config(str(REPO / f"configs/{recipe}.yaml"))  # the recipe it launches is a valid config
    header = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@"):
        assert line in header, (script, line)
    logs = [line.split("=", 1)[1] for line in header.splitlines() if line.startswith("#SBATCH --output=")]
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert logs and all(Path(p).parent.as_posix() == "logs" for p in logs) and "logs/.gitignore" in tracked, \
        "Slurm opens --output before the script runs: its directory must exist in a fresh clone"


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "tiny_cpu"])
def test_a_recipe_splits_its_batch_over_its_slurm_scripts_gpus(recipe):
    """The batch check the trainer runs at start-up (preflight), for the GPUs the job script asks
    for: the recipes' micro-batch of 2 once failed it on every script (the planner's layouts now)."""
    from lrc_dist.preflight import problems

    header = (REPO / "slurm" / f"{recipe}.sh").read_text()
    sbatch = dict(line[len("#SBATCH --"):].split("=", 1) for line in header.splitlines()
                  if line.startswith("#SBATCH --") and "=" in line)
    cfg = load_config(str(REPO / f"configs/{recipe}.yaml"))
    world = int(sbatch["nodes"]) * int(sbatch["gpus-per-node"])
    assert not [p for p in problems(cfg, world) if p.startswith("global_batch_size")], (recipe, world)


def test_slurm_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = sorted(str(p) for p in (REPO / "slurm").glob("*.sh"))
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    proc = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("method,backend", [("lrc", "aot_eager"), ("kd", "aot_eager"),
                                            pytest.param("lrc", "inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_give_the_eager_curve(one_process, tiny_job, tmp_path, monkeypatch, method, backend):
    """parallel.compile: every LRC block's (KD: every layer's) forward is torch.compile'd, its
    activation checkpoint traced with it (the tiny job checkpoints), and the curve is the eager one
    to fp32 rounding. By default through dynamo and AOT autograd without code generation
    (aot_eager: seconds); the product's inductor, which compiles C++ on a CPU (~40 s here), is the
    slow variant."""
    from torch._dynamo.utils import counters

    if backend != "inductor":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    job = {"steps": 3, "model.method": method}
    train(tiny_cfg(tiny_job, tmp_path / "eager", **job))
    counters.clear()
    monkeypatch.setattr("lrc_dist.losses._compiled_kernels", None)  # the compiled kernels end with the test
    train(tiny_cfg(tiny_job, tmp_path / "compiled", **job, **{"parallel.compile": True}))
    assert counters["stats"]["unique_graphs"] >= 2  # a block and the head kernel: fails when nothing compiles
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("eager", "compiled")]
    keys = CURVE_KEYS if method == "lrc" else ("loss", "lm", "kl", "grad_norm")
    assert_same_curve(records[1], records[0], keys, rel=1e-4)

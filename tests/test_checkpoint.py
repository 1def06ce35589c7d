"""Checkpoints a long run can trust, in one process: damaged files are named and skipped, pruning
keeps what matters, a resume refuses a changed config, a diverging run never overwrites its good
checkpoint, one job holds a run dir, and exports are atomic."""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_curve, build_checkpoint
from lrc_dist.checkpoint import Checkpointer, CheckpointDamaged
from lrc_dist.cluster import RunDirLocked, RunLock
from lrc_dist.config import ConfigError
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.model import CausalLM
from lrc_dist.train import NonFiniteLossError, main, train
from test_train import CURVE_KEYS, TINY, tiny_cfg


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


class FileBackend:
    """Writes two files per checkpoint, as a backend's shards."""

    def save(self, path):
        (path / "shard_0.bin").write_bytes(os.urandom(4096))
        (path / "shard_1.bin").write_bytes(os.urandom(4096))


@pytest.fixture
def checkpoints(one_process, tmp_path):
    torch.distributed.init_process_group("gloo")
    ckpt = Checkpointer(tmp_path, keep=3, is_main=True)
    for step in (1, 2, 3):
        ckpt.save(step, FileBackend(), {"step": step})
    return ckpt


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_state"])
def test_a_damaged_checkpoint_is_named_and_resume_falls_back(checkpoints, tmp_path, capsys, damage):
    orphan = tmp_path / "step_00000099"  # intact, but not this run's: latest never named it
    orphan.mkdir()
    (orphan / "train_state.json").write_text(json.dumps({"step": 99}))
    shard = tmp_path / "step_00000003/shard_1.bin"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[7] ^= 1
        shard.write_bytes(bytes(data))
    else:
        (tmp_path / "step_00000003/train_state.json").write_text('{"step": 3, "fil')  # torn
    assert checkpoints.resumable() == tmp_path / "step_00000002"
    warning = capsys.readouterr().out
    named = "train_state.json" if damage == "remove_state" else "shard_1.bin"
    assert "WARNING: resuming from" in warning and f"step_00000003/{named}" in warning, warning
    assert (tmp_path / "step_00000003.damaged").is_dir() and not (tmp_path / "step_00000003").exists()


def test_no_intact_checkpoint_is_an_error_naming_them(checkpoints, tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"step_{step:08d}/shard_0.bin").unlink()
    with pytest.raises(CheckpointDamaged, match=r"no intact checkpoint.*step_00000001/shard_0.bin: missing"):
        checkpoints.resumable()


def test_pruning_goes_by_recorded_step_and_never_removes_latest(one_process, tmp_path):
    torch.distributed.init_process_group("gloo")
    for name, step in (("step_00000099", 0), ("step_00000050", 50)):  # left by other runs
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "train_state.json").write_text(json.dumps({"step": step}))
    ckpt = Checkpointer(tmp_path, keep=1, is_main=True)
    for step in (1, 2):
        ckpt.save(step, FileBackend(), {"step": step})
        assert ckpt.latest() == tmp_path / f"step_{step:08d}" and ckpt.latest().is_dir()
    # step_99 recorded step 0: older than latest, pruned; step_50 lies beyond latest: not this run's, kept
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000050"]


def test_a_resume_past_a_damaged_latest_continues_the_curve(one_process, tiny_job, tmp_path):
    train(tiny_cfg(tiny_job, tmp_path / "ref"))
    run = tmp_path / "run"
    train(tiny_cfg(tiny_job, run, stop_at=5, **{"checkpoint.interval": 2, "checkpoint.keep": 3}))
    shard = next((run / "step_00000005").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated, as by a full disk
    train(tiny_cfg(tiny_job, run, **{"checkpoint.interval": 2, "checkpoint.keep": 3}))  # from step 4
    assert (run / "step_00000005.damaged").is_dir()
    assert_same_curve(records(run), records(tmp_path / "ref"), CURVE_KEYS)


def test_resume_with_another_config_is_refused_listing_the_keys(one_process, tiny_job, tmp_path):
    train(tiny_cfg(tiny_job, tmp_path / "run", stop_at=2))
    moved = shutil.copytree(tiny_job[0], tmp_path / "moved")  # the same teacher elsewhere: still a change
    with pytest.raises(ConfigError, match=r"changed: data.seq_len: 32 -> 16; model.teacher: .* -> .*moved.*"
                                          r"allow_changes=\[data.seq_len,model.teacher\]"):
        train(tiny_cfg(tiny_job, tmp_path / "run", **{"data.seq_len": 16, "model.teacher": str(moved)}))
    # the run's length and layout may change by design: extend it, with another micro batch
    train(tiny_cfg(tiny_job, tmp_path / "run", steps=7, micro_batch_size=1, **{"log.interval": 2}))
    assert records(tmp_path / "run")[-1]["step"] == 7


def test_a_resume_after_lost_steps_logs_each_step_once_and_keeps_the_wandb_run(one_process, tiny_job, tmp_path,
                                                                                monkeypatch):
    """A crash after step 4 that lost its checkpoint (resume from step 2): the steps 3-4 logged
    before the crash are not logged twice, and wandb continues the same run."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb = {"log.wandb_project": "lrc_test", "checkpoint.interval": 2}
    train(tiny_cfg(tiny_job, tmp_path / "ref", **{"log.wandb_project": None}))
    train(tiny_cfg(tiny_job, tmp_path / "run", stop_at=4, **wandb))
    (tmp_path / "run/latest").write_text("step_00000002")  # as if killed before step 4's checkpoint
    train(tiny_cfg(tiny_job, tmp_path / "run", **wandb))
    assert_same_curve(records(tmp_path / "run"), records(tmp_path / "ref"), CURVE_KEYS)
    runs = sorted((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1, runs


def poison(monkeypatch, bad_calls, scale=float("nan")):
    """Scale the loss (and its logged value) of the given forward calls; `bad_calls(n)` decides."""
    forward, calls = LowRankClone.forward, []

    def poisoned(self, *args, **kwargs):
        loss, metrics = forward(self, *args, **kwargs)
        calls.append(1)
        if bad_calls(len(calls)):
            return loss * scale, {**metrics, "loss": metrics["loss"] * scale}
        return loss, metrics

    monkeypatch.setattr(LowRankClone, "forward", poisoned)


def test_divergence_keeps_the_last_good_checkpoint_and_names_it(one_process, tiny_job, tmp_path, monkeypatch, capsys):
    """Finite steps 1-3, then NaN for good: no checkpoint is written during the streak, so keep=1
    never prunes step 3's, and the abort names it; console and metrics number steps alike."""
    poison(monkeypatch, lambda call: call > 6)  # 2 micro-batches per step
    cfg = tiny_cfg(tiny_job, tmp_path, max_bad_steps=3, **{"checkpoint.interval": 1, "checkpoint.keep": 1})
    with pytest.raises(NonFiniteLossError, match=r"resume from .*step_00000003, the last checkpoint before the streak"):
        train(cfg)
    assert (tmp_path / "latest").read_text() == "step_00000003" and (tmp_path / "step_00000003").is_dir()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003"]
    skipped = [r["step"] for r in records(tmp_path) if r["skipped_steps"]]
    console = capsys.readouterr().out
    assert skipped == [4, 5, 6] and all(f"step {s}: non-finite loss, step skipped" in console for s in skipped)


def test_a_stop_signal_during_a_bad_streak_writes_no_checkpoint(one_process, tiny_job, tmp_path, monkeypatch):
    import signal

    from lrc_dist.train import Preempted

    def nan_from_step_3_and_sigterm_in_step_4(call):
        if call == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return call > 4

    poison(monkeypatch, nan_from_step_3_and_sigterm_in_step_4)
    with pytest.raises(Preempted, match=r"after step 4; .*step_00000002 is the checkpoint to resume from"):
        train(tiny_cfg(tiny_job, tmp_path, **{"checkpoint.interval": 1}))
    assert (tmp_path / "latest").read_text() == "step_00000002"


def test_stop_signals_raise_a_flag_and_a_second_ctrl_c_stops_at_once():
    import signal

    from lrc_dist.cluster import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGUSR1)  # later signals keep the first one's name
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_loss_spike_guard_skips_the_step_like_a_nan(one_process, tiny_job, tmp_path, monkeypatch):
    """With loss_spike_factor, a step whose loss jumps 100x is skipped exactly as a NaN step would
    be (same curve after it); without it, the step is taken."""
    spike_call = 2 * 11 + 1  # the first micro-batch of step 12, after SPIKE_WARMUP good steps
    curves = {}
    for name, scale, factor in (("nan", float("nan"), None), ("spike", 100.0, 3.0), ("off", 100.0, None)):
        poison(monkeypatch, lambda call: call == spike_call, scale)
        train(tiny_cfg(tiny_job, tmp_path / name, steps=14, loss_spike_factor=factor))
        curves[name] = records(tmp_path / name)
    assert [r["step"] for r in curves["spike"] if r["skipped_steps"]] == [12]
    assert_same_curve(curves["spike"], curves["nan"], ("loss", "lm", "kl", "clone", "grad_norm"), nan_ok=True)
    assert not any(r["skipped_steps"] for r in curves["off"])


# ---- one job per run directory ----------------------------------------------------------------------


def write_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "lock").write_text(json.dumps(holder))


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        here = socket.gethostname()
        ticks = RunLock(tmp_path).record["start_ticks"] is not None
        write_lock(tmp_path, host=here, pid=sleeper.pid, slurm_job_id="11", since="then")
        with pytest.raises(RunDirLocked, match=rf"in use by another job: pid {sleeper.pid} on {here}, Slurm job 11"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ticks
    with RunLock(tmp_path) as lock:  # the holder is gone: taken over
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second job while this one holds it
        assert lock.path.is_file()
    assert not (tmp_path / "lock").exists()  # released


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start_ticks=1)  # our pid, another start
    with RunLock(tmp_path):
        pass


def test_locks_of_other_hosts_go_stale_and_a_requeued_job_takes_its_own(tmp_path, monkeypatch):
    write_lock(tmp_path, host="gpu-b07", pid=123, slurm_job_id="77")
    with pytest.raises(RunDirLocked, match="pid 123 on gpu-b07, Slurm job 77"):
        RunLock(tmp_path, stale_after=600).acquire()  # fresh heartbeat: alive, as far as we can tell
    old = time.time() - 3600
    os.utime(tmp_path / "lock", (old, old))
    with RunLock(tmp_path, stale_after=600):
        pass
    write_lock(tmp_path, host="gpu-b07", pid=123, slurm_job_id="77", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a second launch inside the same allocation: live
    with pytest.raises(RunDirLocked, match="pid 123 on gpu-b07, Slurm job 77"):
        RunLock(tmp_path, stale_after=600).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued onto another node
    with RunLock(tmp_path, stale_after=600):
        pass


def _contend(run_dir, start, results):
    start.wait()
    try:
        RunLock(run_dir).acquire()  # held until the process exits
        results.put("held")
    except RunDirLocked:
        results.put("refused")


@pytest.mark.parametrize("left", ["no lock", "a dead holder's lock"])
def test_of_jobs_starting_together_exactly_one_gets_the_lock(tmp_path, left):
    import multiprocessing

    if left != "no lock":
        write_lock(tmp_path, host=socket.gethostname(), pid=2**22 + 17, since="then")  # no such pid
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    jobs = [ctx.Process(target=_contend, args=(tmp_path, start, results)) for _ in range(4)]
    for job in jobs:
        job.start()
    start.set()
    outcomes = sorted(results.get(timeout=60) for _ in jobs)
    for job in jobs:
        job.join()
    assert outcomes == ["held", "refused", "refused", "refused"]


def test_the_trainer_refuses_a_run_dir_in_use_before_loading_anything(one_process, tiny_job, tmp_path, capsys,
                                                                      monkeypatch):
    sleeper = subprocess.Popen(["sleep", "60"])
    write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid, since="then")
    monkeypatch.setattr(CausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded the teacher"))
    teacher, tokens = tiny_job
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([TINY, f"--model.teacher={teacher}", f"--data.paths=[{tokens}]", f"--checkpoint.dir={tmp_path}"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert exit_info.value.code == 69
    assert f"pid {sleeper.pid}" in capsys.readouterr().err


# ---- exports ----------------------------------------------------------------------------------------


def test_export_is_atomic_and_a_resume_redoes_a_missing_one(one_process, tiny_job, tmp_path, monkeypatch):
    import lrc_dist.export as export

    save = export.save_student

    def killed_midway(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("killed while writing the export")

    monkeypatch.setattr(export, "save_student", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_job, tmp_path))
    assert not (tmp_path / "export_00000006").exists() and (tmp_path / "latest").read_text() == "step_00000006"
    monkeypatch.setattr(export, "save_student", save)
    train(tiny_cfg(tiny_job, tmp_path))  # the run is complete; only its export is redone
    hf = tmp_path / "export_00000006/hf"
    assert {p.name for p in hf.iterdir()} >= {"README.md", "config.json", "model.safetensors", "tokenizer.json"}
    assert "| steps | 6 of 6 |" in (hf / "README.md").read_text()
    assert load_file(hf / "model.safetensors")


def test_a_width_the_family_cannot_export_is_refused_before_training(tmp_path):
    teacher = CausalLM.from_pretrained(build_checkpoint(tmp_path / "llama", "llama3"))  # 4 heads, width 64
    with pytest.raises(ValueError, match=r"student width 30: .*not a multiple of the number of attention heads.*"
                                         r"nearest widths that work: 28 or 32"):
        LowRankClone(teacher, LRCConfig(student_hidden_size=30))
    LowRankClone(CausalLM.from_pretrained(build_checkpoint(tmp_path / "qwen", "qwen2")), LRCConfig(30))  # Qwen2 can


def test_checkpoint_interval_minutes_adds_time_based_checkpoints(one_process, tiny_job, tmp_path, monkeypatch):
    """Every clock reading is 10 minutes after the last: with interval_minutes=15, a checkpoint falls
    due every second step, beside the (here never reached) step interval."""
    import types

    import lrc_dist.train as trainer

    clock = iter(range(0, 10**6, 600))
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=trainer.time.perf_counter,
                                                               monotonic=lambda: next(clock)))
    cfg = tiny_cfg(tiny_job, tmp_path, **{"checkpoint.interval": 1000, "checkpoint.keep": 10,
                                           "checkpoint.interval_minutes": 15})
    train(cfg)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]


def test_export_takes_only_floating_point_dtypes(tmp_path):
    from lrc_dist.export import main as export

    with pytest.raises(ValueError, match="'int8' is not a floating-point torch dtype lrc_dist takes; use bfloat16"):
        export(str(tmp_path), str(tmp_path / "out"), dtype="int8")


def test_another_teacher_at_the_same_path_is_refused_by_resume_and_export(one_process, tiny_job, tmp_path):
    from lrc_dist.export import export_checkpoint
    from lrc_dist.model import CheckpointError

    teacher = shutil.copytree(tiny_job[0], tmp_path / "teacher")
    cfg = {"model.teacher": str(teacher)}
    train(tiny_cfg(tiny_job, tmp_path / "run", stop_at=2, **cfg))
    build_checkpoint(tmp_path / "other", "qwen2", seed=1, vocab_size=300)  # same shapes, other weights
    shutil.copy(tmp_path / "other/model.safetensors", teacher / "model.safetensors")  # retrained in place
    with pytest.raises(ConfigError, match=r"model.teacher: .*step_00000002 was trained with another teacher"):
        train(tiny_cfg(tiny_job, tmp_path / "run", **cfg))
    with pytest.raises(CheckpointError, match="was trained with another teacher"):
        export_checkpoint(tmp_path / "run", tmp_path / "out", dtype="float32")

"""The planner (`python -m lrc_dist.plan`): its fake-tensor step predicts the peak that the memory
tracker measures on a real step of the same layout (2 gloo ranks, real tensors), for both teacher
placements and activation checkpointing on and off; its depth extrapolation equals the full-depth
run; its command line and errors. This file is also its own torchrun worker (the real runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
KEYS = ("teacher", "activation_checkpointing", "micro_batch_size", "shard_generation")


def write_job(tmp_path: Path) -> Path:
    """A 5-layer teacher's config.json (no weights: the planner never reads them) and a recipe of it."""
    teacher = tmp_path / "teacher"
    AutoConfig.for_model("qwen2", hidden_size=128, intermediate_size=320, num_hidden_layers=5, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False).save_pretrained(teacher)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  teacher: {teacher}\n  lrc:\n    student_hidden_size: 64\ndata:\n  seq_len: 96\n"
                      f"micro_batch_size: 1\nglobal_batch_size: 4\n")
    return recipe


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def test_plan_predicts_the_tracked_peak_of_a_real_step(tmp_path):
    recipe = write_job(tmp_path)
    plan = start([sys.executable, __file__, "plan", str(recipe), str(tmp_path / "plan.json")])
    real = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "real",
                  str(recipe), str(tmp_path / "real.json")])
    (code, _, err), (real_code, real_out, real_err) = finish(plan), finish(real)
    assert code == 0, err[-5000:]
    assert real_code == 0, real_out[-3000:] + real_err[-5000:]
    planned = json.loads((tmp_path / "plan.json").read_text())
    measured = json.loads((tmp_path / "real.json").read_text())
    assert len(measured) == 4  # teacher replicate/shard x activation checkpointing on/off
    for row in measured:
        for depths in ("extrapolated", "full"):
            got = next(c for c in planned[depths]["candidates"] if {k: c[k] for k in KEYS} == row["layout"])
            total = got["peak_gb"]["total"] * 2**30
            assert total == pytest.approx(row["peak"]["total"], rel=0.10), (depths, row, got["peak_gb"])
            # what the real run holds for certain: the teacher (replicated: all of it) and the masters
            assert got["peak_gb"]["teacher"] * 2**30 == pytest.approx(row["peak"]["teacher"], rel=0.01)
            assert got["peak_gb"]["params"] * 2**30 == pytest.approx(row["peak"]["params"], rel=0.01)
    by = {(c["teacher"], c["activation_checkpointing"]): c["peak_gb"] for c in planned["full"]["candidates"]}
    # what the layouts are for: sharding the teacher holds less of it, checkpointing fewer activations
    assert by["shard", True]["teacher"] < 0.6 * by["replicate", True]["teacher"]
    assert by["replicate", True]["activations"] < 0.7 * by["replicate", False]["activations"]
    for depths in ("extrapolated", "full"):  # the recommendation is the fastest candidate that fits
        fitting = [c for c in planned[depths]["candidates"] if c["fits"]]
        assert planned[depths]["recommended"]["tokens_per_s_per_gpu"] == pytest.approx(
            max(c["tokens_per_s_per_gpu"] for c in fitting), rel=0.01)


def test_plan_cli_prints_json_and_a_table(tmp_path, capsys):
    from lrc_dist.plan import main, report

    recipe = write_job(tmp_path)
    main([str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gb", "80", "--json", "--teacher", "shard",
          "--shard-generation", "on", "--activation-checkpointing", "on", "--micro-batch-sizes", "1", "2"])
    result = json.loads(capsys.readouterr().out)
    first = result["candidates"][0]
    assert {"backend", "teacher", "activation_checkpointing", "micro_batch_size", "shard_generation", "peak_gb",
            "fits", "tokens_per_s_per_gpu"} <= set(first)
    assert {"teacher", "params", "grads", "optimizer", "activations", "total"} <= set(first["peak_gb"])
    assert [(c["teacher"], c["shard_generation"], c["micro_batch_size"]) for c in result["candidates"]] == [
        ("shard", True, 1), ("shard", True, 2)]
    assert result["recommended"]["micro_batch_size"] == 2  # fewer weight generations per token: faster
    table = report(result)
    assert "recommended: teacher shard" in table and "--micro_batch_size=2" in table, table
    for row in result["candidates"]:
        row["fits"] = False
    assert "recommended: none fits" in report({**result, "recommended": None})


@pytest.mark.parametrize("args, says", [
    (["--gpus-per-node", "3"], "--global_batch_size=6"),
    (["--micro-batch-sizes", "3"], "--micro-batch-sizes [3]"),
    (["--model.teacher=/nowhere/Some-Model"], "model.teacher=/nowhere/Some-Model: no config.json"),
    (["--model.method=kd"], "model.method=lrc"),
])
def test_plan_names_what_is_wrong(tmp_path, capsys, args, says):
    from lrc_dist.plan import main

    recipe = write_job(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gb", "80", *args])
    assert stop.value.code == 2
    assert says in capsys.readouterr().err


def _plan(recipe: str, out: str) -> None:
    from lrc_dist.config import parse_args
    from lrc_dist.plan import Grid, plan

    cfg, grid = parse_args([recipe]), Grid(shard_generation=(False,), micro_batch_sizes=(2,))
    result = {depths: plan(cfg, 1, 2, 80.0, full_depth=depths == "full", grid=grid)
              for depths in ("extrapolated", "full")}
    Path(out).write_text(json.dumps(result))


def _real(recipe: str, out: str) -> None:
    from lrc_dist.config import parse_args
    from lrc_dist.plan import Candidate, measure, teacher_config

    dist.init_process_group("gloo")
    cfg = parse_args([recipe])
    hf_config, _ = teacher_config(cfg)
    rows = []
    for teacher in ("replicate", "shard"):
        for ac in (True, False):
            cand = Candidate("fsdp", teacher, ac, 2, False)
            peak = measure(cfg, hf_config, cand, None, fake=False)
            rows.append({"layout": {k: getattr(cand, k) for k in KEYS}, "peak": peak})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    {"plan": _plan, "real": _real}[sys.argv[1]](*sys.argv[2:])


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_at_a_tiny_shape(tmp_path):
    """bench/gpu_check.sh --device cpu --tiny: the GPU proof's steps (FSDP2 and ZeRO-3 through the
    trainer's take_step, the planner's prediction, the dense-step ratio) and its summary."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bench/gpu_check.sh", "--device", "cpu", "--tiny"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("step_*.json")}
    assert set(steps) == {"step_tiny_fsdp", "step_tiny_deepspeed"}
    assert all(s["tokens_per_s"] > 0 and s["loss"] > 0 for s in steps.values())
    assert steps["step_tiny_fsdp"]["predicted_peak_gb"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| tiny | fsdp | cpu |" in summary and "| tiny | deepspeed | cpu |" in summary
    assert "ratio LRC/dense" in summary

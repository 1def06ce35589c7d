"""The front door: every entry point answers --help, the train CLI is generated from the config
tree and checks types, and one validation pass lists every problem before anything loads."""

import shutil
import subprocess
import sys

import pytest

from lrc_dist import preflight
from lrc_dist.config import ConfigError, keys, load_config, parse_args
from lrc_dist.model import CausalLM
from lrc_dist.train import main
from test_train import ENV, REPO, TINY, tiny_cfg

HELP = {
    "train": [sys.executable, "-m", "lrc_dist.train", "--help"],
    "export": [sys.executable, "-m", "lrc_dist.export", "--help"],
    "evaluate": [sys.executable, "-m", "lrc_dist.evaluate", "--help"],
    "demo": [sys.executable, "-m", "lrc_dist.demo", "--help"],
    "tokenize": [sys.executable, "data_prep/tokenize.py", "--help"],
    "tokenize verify": [sys.executable, "data_prep/tokenize.py", "verify", "--help"],
    "tokenize merge": [sys.executable, "data_prep/tokenize.py", "merge", "--help"],
}


@pytest.mark.parametrize("entry", sorted(HELP))
def test_every_entry_point_answers_help(entry):
    proc = subprocess.run(HELP[entry], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    if entry == "tokenize":
        assert "verify" in text and "merge" in text, text
    if entry == "tokenize verify":
        assert "DIR" in text and "OUTPUT" not in text, text
    if entry == "train":  # every key of the tree, with its type and default, generated from it
        for key in keys():
            assert f"--{key} " in text or f"--{key}\n" in text, key
        assert "--optim.schedule {linear,cosine}" in text and "(type: int, default: 1000)" in text


def test_overrides_are_typed_and_coerced(tiny_job, tmp_path):
    cfg = parse_args([TINY, "--steps=7", "--optim.lr=1e-3", "--data.paths=[a,b]", "--data.weights=[1,2]",
                      "--parallel.activation_checkpointing=false", "--log.wandb_project=null",
                      "--optim.betas=[0.9,0.95]", "--model.lrc.clone_terms=[q,k]"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.paths, cfg.data.weights) == (7, 1e-3, ["a", "b"], [1.0, 2.0])
    assert cfg.parallel.activation_checkpointing is False and cfg.log.wandb_project is None
    assert cfg.optim.betas == (0.9, 0.95) and cfg.model.lrc.clone_terms == ("q", "k")
    assert cfg.model.lrc.student_hidden_size == 32  # the rest from the file


@pytest.mark.parametrize("arg, message", [
    ("--steps=ten", "steps: expected int, got 'ten'"),
    ("--optim.schedule=foo", "optim.schedule: expected one of linear, cosine, got 'foo'"),
    ("--stop_at=soon", "stop_at: expected int or null, got soon"),
    ("--optim.lrr=1", "unknown config key optim.lrr (the command line); did you mean optim.lr"),
    ("--parallel.backend=ddp", "parallel.backend: expected one of fsdp, deepspeed, none, got 'ddp'"),
    ("--model.lrc.init=pca", "model.lrc.init: expected one of random, activation, channels, svd, got 'pca'"),
])
def test_a_bad_override_names_key_value_and_expectation(arg, message):
    with pytest.raises(ConfigError) as error:
        parse_args([TINY, arg])
    assert message in str(error.value)


def test_a_bad_key_in_a_file_is_named_with_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key optim.lrr \(.*bad.yaml\); did you mean optim.lr"):
        load_config(str(tmp_path / "bad.yaml"))


def test_a_user_error_is_one_message_and_exit_2_before_the_teacher_loads(tiny_job, capsys, monkeypatch, one_process):
    monkeypatch.setattr(CausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded the teacher"))
    teacher, tokens = tiny_job
    for bad in ("--steps=ten", "--checkpoint.interval=0"):
        with pytest.raises(SystemExit) as exit_info:
            main([TINY, f"--model.teacher={teacher}", f"--data.paths=[{tokens}]", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: a problem with the configuration:") and "Traceback" not in err, err


def test_one_pass_lists_every_problem(tiny_job, tmp_path):
    teacher, tokens = tiny_job
    cfg = tiny_cfg(tiny_job, tmp_path, steps=0, global_batch_size=6, **{
        "checkpoint.interval": 0, "log.interval": 0, "data.paths": [tokens, str(tmp_path / "nowhere")],
        "data.weights": [1.0, 2.0, 3.0], "parallel.backend": "deepspeed", "parallel.deepspeed_config": "ds/nope.json",
        "model.lrc.student_hidden_size": 999, "optim.lr": 0.0, "loss_spike_factor": 0.5,
        "model.lrc.init_samples": 0})
    found = "\n".join(preflight.problems(cfg, world_size=4))
    for expected in ("steps=0 must be at least 1", "checkpoint.interval=0 must be at least 1",
                     "log.interval=0 must be at least 1", "optim.lr=0.0 must be positive",
                     "loss_spike_factor=0.5 must exceed 1",
                     "global_batch_size=6 must be a multiple of micro_batch_size * world size = 2 * 4",
                     "data.weights has 3 weights for 2 data.paths", "data.paths[1]=", "has no manifest.json",
                     "parallel.deepspeed_config=ds/nope.json does not exist",
                     "model.lrc.student_hidden_size=999 must be in 1..64",
                     "model.lrc.init_samples=0 must be at least 1"):
        assert expected in found, (expected, found)
    assert preflight.problems(tiny_cfg(tiny_job, tmp_path), world_size=1) == []


def test_paths_family_width_and_tokenizer_are_checked(tiny_job, tmp_path):
    from conftest import build_checkpoint

    teacher, tokens = tiny_job
    problems = preflight.problems(tiny_cfg(tiny_job, tmp_path, **{"model.teacher": str(tmp_path / "none")}), 1)
    assert problems == [f"model.teacher={tmp_path / 'none'} does not exist; pass a local Hugging Face checkpoint directory"]
    other = shutil.copytree(teacher, tmp_path / "other_tokenizer")
    shutil.copy(REPO / "assets/tokenizers/gpt2/tokenizer.json", other / "tokenizer.json")
    (problem,) = preflight.problems(tiny_cfg(tiny_job, tmp_path, **{"model.teacher": str(other)}), 1)
    assert problem.startswith("data.paths[0]:") and "not the teacher's" in problem and "retokenize" in problem
    llama = build_checkpoint(tmp_path / "llama", "llama3", vocab_size=300)  # 4 heads: Llama needs d_S % 4 == 0
    shutil.copy(teacher + "/tokenizer.json", tmp_path / "llama/tokenizer.json")
    (problem,) = preflight.problems(tiny_cfg(tiny_job, tmp_path, **{"model.teacher": llama,
                                                                     "model.lrc.student_hidden_size": 30}), 1)
    assert problem.startswith("model.lrc.student_hidden_size: student width 30") and "28 or 32" in problem


def test_a_single_data_path_needs_no_weights(tiny_job, tmp_path):
    cfg = tiny_cfg(tiny_job, tmp_path, **{"data.weights": [18.0, 2.0, 1.0, 0.45]})  # a recipe's, for 4 sets
    assert preflight.problems(cfg, 1) == []


def test_under_torchrun_a_user_error_is_printed_once(tiny_job, tmp_path):
    teacher, tokens = tiny_job
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lrc_dist.train", TINY, f"--model.teacher={teacher}", f"--data.paths=[{tokens}]",
                           f"--checkpoint.dir={tmp_path}", "--parallel.backend=fsdp", "--log.interval=0"],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("log.interval=0 must be at least 1") == 1, out[-3000:]
    assert f'File "{REPO / "lrc_dist"}' not in out, "a traceback from the ranks"  # torchrun adds its own summary


def test_config_file_mistakes_are_one_clear_message(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_args(["configs/nope.yaml"])
    assert str(error.value) == ("a problem with the configuration:\n  - config configs/nope.yaml does not exist; "
                                "pass a YAML file or a .py recipe (see configs/).")
    with pytest.raises(ConfigError, match=r"CONFIG \(.*tiny_cpu.yaml\) must come first"):
        parse_args(["--steps=3", TINY])  # it would have been ignored
    (tmp_path / "sparse.yaml").write_text("log:\n  # interval: 5\nsteps: 3\n")  # a section left empty
    assert parse_args([str(tmp_path / "sparse.yaml")]).log.interval == 10


def test_more_combinations_are_checked_before_loading(tiny_job, tmp_path):
    (tmp_path / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    cfg = tiny_cfg(tiny_job, tmp_path, **{"model.method": "kd", "parallel.shard_generation": True,
                                          "parallel.backend": "deepspeed", "parallel.deepspeed_config":
                                          str(tmp_path / "zero0.json"), "optim.betas": [0.9, 1.5]})
    found = "\n".join(preflight.problems(cfg, 1))
    for expected in ("parallel.shard_generation shares out LRC's weight generation; model.method=kd",
                     "needs zero_optimization.stage >= 1", "optim.betas=[0.9, 1.5]: each must be in [0, 1)"):
        assert expected in found, (expected, found)
    no_weights = shutil.copytree(tiny_job[0], tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    (problem,) = preflight.problems(tiny_cfg(tiny_job, tmp_path, **{"model.teacher": str(no_weights)}), 1)
    assert problem.startswith("model.teacher:") and "no model.safetensors" in problem


def test_help_writes_exit_code_0(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_EXIT_FILE", str(tmp_path / "code"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and (tmp_path / "code").read_text().strip() == "0"

"""An installable package: the built wheel holds the recipes, DeepSpeed configs, tokenizers and
tasks, and once installed into a fresh environment its console scripts work from any directory."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from test_train import ENV, REPO


@pytest.mark.slow
def test_the_wheel_installs_and_runs_from_another_directory(tmp_path):
    leftovers = not (REPO / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    if leftovers:  # setuptools builds in the tree: leave the clone as it was
        shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = (tmp_path / "dist").glob("lrc_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("lrc_dist/configs/lrc_qwen7b.yaml", "lrc_dist/ds_configs/zero3.json",
                    "lrc_dist/assets/tokenizers/gpt2/tokenizer.json", "lrc_dist/assets/tasks/pydoc_cloze.jsonl"):
        assert shipped in names, shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # A fresh venv; its dependencies come from this one (a .pth line: no editable lrc_dist with them).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = lambda *cmd: subprocess.run(cmd, cwd=elsewhere, env=ENV, capture_output=True, text=True)  # noqa: E731
    where = run(python, "-c", "import lrc_dist, lrc_dist.resources as r; print(lrc_dist.__file__); "
                              "print(r.shipped('ds_configs/zero3.json'))")
    assert where.returncode == 0, where.stderr
    package, zero3 = where.stdout.split()
    assert package.startswith(str(site)) and Path(zero3).is_file() and zero3.startswith(str(site))
    for script in ("lrc-train", "lrc-export", "lrc-evaluate", "lrc-tokenize", "lrc-demo"):
        proc = run(venv / "bin" / script, "--help")
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
    (elsewhere / "corpus.jsonl").write_text('{"text": "a tiny corpus to tokenize"}\n' * 20)
    tokenized = run(venv / "bin" / "lrc-tokenize", "--input", "corpus.jsonl", "--output", "tokens", "--workers", "1",
                    "--tokenizer", str(site / "lrc_dist/assets/tokenizers/gpt2"), "--progress", "False")
    assert tokenized.returncode == 0, tokenized.stderr[-2000:]
    assert (elsewhere / "tokens/manifest.json").is_file()
    recipe = run(python, "-c", "from lrc_dist.config import load_config; print(load_config('configs/lrc_qwen7b.yaml').steps)")
    assert recipe.stdout.strip() == "274658", recipe.stderr  # a shipped recipe, found from elsewhere

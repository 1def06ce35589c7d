"""Evaluate a Hugging Face checkpoint (an exported student, or a teacher).

    python -m lrc_dist.evaluate perplexity MODEL_DIR TOKENS_DIR [--seq_len 512] [--max_windows 200]
    python -m lrc_dist.evaluate choice MODEL_DIR assets/tasks/pydoc_cloze/pydoc_cloze.jsonl
    python -m lrc_dist.evaluate harness MODEL_DIR --tasks arc_easy,piqa [--device cuda] [--limit 100]

Models load through `transformers.AutoModelForCausalLM` (local files only), so what is measured
is the checkpoint exactly as users will load it, independent of lrc_dist's own model code.

- perplexity: exp(mean next-token NLL) over non-overlapping windows of a token set written by
  data_prep/tokenize.py (a held-out split); the token set must match the model's tokenizer. Also
  bits per byte, the summed NLL in bits over the predicted tokens' bytes (EOS counts one): it
  compares models of different vocabularies on the same text (LRC across tokenizers).
- choice: a multiple-choice task in JSON lines {"query", "choices", "gold"}, scored like
  lm-evaluation-harness: log-likelihood of each choice after the query; acc, and acc_norm with
  the log-likelihood divided by the choice's length in characters.
- harness: lm-evaluation-harness (`pip install -e ".[eval]"`) with `--model hf` on the paper's
  tasks (PAPER_TASKS) when their datasets are reachable, plus the tasks shipped in
  assets/tasks/ (lm-eval YAML over local files: they run offline).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lrc_dist.align import ByteVocab
from lrc_dist.data import TokenSet
from lrc_dist.resources import PACKAGE, keep_freed_cpu_memory

SHIPPED_TASKS = PACKAGE / "assets" / "tasks"
# The LRC paper's zero-shot suite, by lm-evaluation-harness task name.
PAPER_TASKS = ("arc_easy", "arc_challenge", "logiqa", "commonsense_qa", "piqa", "winogrande", "boolq", "sciq", "mmlu")


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a Hugging Face checkpoint dir (e.g. an export).")
    if torch.device(device).type == "cpu":
        keep_freed_cpu_memory()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True)
    return model.to(device).eval()


@torch.no_grad()
def perplexity(model_dir: str, tokens: str, seq_len: int = 512, max_windows: int | None = None,
               batch_size: int = 8, dtype: str = "float32", device: str = "cpu", progress: bool = True,
               rank_windows: int = 0) -> dict:
    """{"perplexity", "nll", "tokens", "bits_per_byte"} of the model on token set `tokens`
    (non-overlapping windows; bits per byte needs the model dir's tokenizer.json); with
    `rank_windows`, also "effective_rank": that of the final hidden states of the first
    `rank_windows` windows (`effective_rank`)."""
    token_set = TokenSet.open(tokens)
    model = load_model(model_dir, dtype, device)
    token_set.check_teacher(model.config.vocab_size, model_dir)
    lengths = token_bytes(model_dir)
    windows = token_set.num_tokens // (seq_len + 1)
    if windows == 0:
        raise ValueError(f"{tokens} holds {token_set.num_tokens} tokens: fewer than one window of {seq_len + 1}.")
    windows = min(windows, max_windows or windows)
    nll, count, hidden, num_bytes = 0.0, 0, [], 0
    for start in tqdm(range(0, windows, batch_size), desc=f"perplexity {Path(model_dir).name}", disable=not progress):
        rows = [token_set.read(w * (seq_len + 1), seq_len + 1) for w in range(start, min(start + batch_size, windows))]
        batch = torch.as_tensor(np.stack(rows).astype(np.int64), device=device)
        out = model(batch[:, :-1], output_hidden_states=start < rank_windows)
        if start < rank_windows:
            hidden.append(out.hidden_states[-1][: rank_windows - start].float().cpu())
        nll += F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
        num_bytes += int(lengths[batch[:, 1:].cpu()].sum()) if lengths is not None else 0
    result = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if lengths is not None:
        result["bits_per_byte"] = nll / math.log(2) / num_bytes
    if hidden:
        result["effective_rank"] = effective_rank(torch.cat(hidden))
    return result


def token_bytes(model_dir: str | Path) -> torch.Tensor | None:
    """Each token id's length in bytes (EOS: one), from MODEL_DIR/tokenizer.json; None without one
    or when its tokens' bytes can't be read (a warning says why)."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    try:
        vocab = ByteVocab.load(model_dir)
    except ValueError as e:  # no EOS named, or not a byte-exact tokenizer: perplexity alone
        warnings.warn(f"{model_dir}: no bits per byte ({e})", stacklevel=2)
        return None
    lengths = torch.tensor([len(p) for p in vocab.pieces])
    lengths[vocab.eos_id] = 1
    return lengths


def effective_rank(hidden: torch.Tensor) -> float:
    """The effective rank of hidden states [..., d] (Roy & Vetterli, 2007): exp of the entropy of
    their singular values normalised to sum 1, over the matrix of all positions (not centred). It is
    d for states spread evenly over d directions, and k for states spread evenly over k of them.
    Singular values under the rounding of the input's dtype count as zero, as in matrix_rank.
    RED reports that LRC's random projections collapse it in the student (docs/METHOD.md)."""
    matrix = hidden.reshape(-1, hidden.shape[-1])
    s = torch.linalg.svdvals(matrix.double())
    s = s[s > s.max() * max(matrix.shape) * torch.finfo(hidden.dtype).eps]
    p = s / s.sum()
    return math.exp(-(p * p.log()).sum().item())


def read_task(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist (shipped tasks: {SHIPPED_TASKS}).")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, item in enumerate(items):
        if not {"query", "choices", "gold"} <= set(item) or not 0 <= item["gold"] < len(item["choices"]):
            raise ValueError(f"{path}:{i + 1}: an item needs query, choices and a gold index into choices.")
    return items


@torch.no_grad()
def choice(model_dir: str, task: str, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> dict:
    """{"acc", "acc_norm", "items"} of the model on a multiple-choice task file."""
    from transformers import AutoTokenizer

    items = read_task(task)
    model = load_model(model_dir, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    correct = correct_norm = 0
    for item in tqdm(items, desc=f"{Path(task).stem} {Path(model_dir).name}", disable=not progress):
        context = tokenizer(item["query"], add_special_tokens=False)["input_ids"]
        scores, normed = [], []
        for text in item["choices"]:
            continuation = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation], device=device)
            logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0, len(context) - 1 :]
            ll = logp.gather(-1, ids[0, len(context) :, None]).sum().item()
            scores.append(ll)
            normed.append(ll / len(text))  # characters, as lm-eval's acc_norm
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["gold"])
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == item["gold"])
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def write_harness_tasks(directory: Path) -> None:
    """An lm-eval task YAML per shipped task file, scored as `choice` scores it (no delimiter:
    choices carry their own leading space). The data path is absolute, so it runs from anywhere."""
    for task in sorted(SHIPPED_TASKS.glob("*.jsonl")):
        (directory / f"{task.stem}.yaml").write_text(HARNESS_TASK.format(name=task.stem, path=json.dumps(str(task))))


HARNESS_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def harness(model_dir: str, tasks: str | tuple = PAPER_TASKS, dtype: str = "float32", device: str = "cpu",
            batch_size: int = 8, num_fewshot: int = 0, limit: int | None = None, output: str | None = None) -> dict:
    """lm-evaluation-harness `--model hf` on `tasks` (comma-separated); the shipped tasks are included."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError('lm-evaluation-harness is not installed: pip install -e ".[eval]"') from e
    names = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    with tempfile.TemporaryDirectory() as include:
        write_harness_tasks(Path(include))
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype, "local_files_only": True},
            tasks=names, num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
            task_manager=TaskManager(include_path=include),
        )
    summary = {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and not k.startswith("alias")}
               for task, metrics in results["results"].items()}
    if output:
        Path(output).write_text(json.dumps(summary, indent=2))
    return summary


def cli() -> None:
    """`lrc-evaluate` / `python -m lrc_dist.evaluate`: perplexity | choice | harness."""
    fire.Fire({"perplexity": perplexity, "choice": choice, "harness": harness}, name="lrc-evaluate")


if __name__ == "__main__":
    cli()

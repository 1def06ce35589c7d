"""The model interface: both model classes provide every member of `interface.DistillationModel`
with its signature, and the trainer, the backends and the export use nothing else of them and never
ask which class they hold."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import lrc_dist
from conftest import build_checkpoint
from lrc_dist import kd, lrc, model
from lrc_dist.interface import DistillationModel
from lrc_dist.kd import KnowledgeDistillation, student_like
from lrc_dist.lrc import LowRankClone, LRCConfig
from lrc_dist.model import CausalLM

PACKAGE = Path(lrc_dist.__file__).parent
USERS = ("train.py", "parallel.py", "export.py", "build.py", "checkpoint.py", "metrics.py")
MODEL_CLASSES = sorted(name for module in (lrc, kd, model) for name, c in vars(module).items()
                       if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == module.__name__)
MEMBERS = sorted({n for n in vars(DistillationModel) if not n.startswith("_")} | set(DistillationModel.__annotations__))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("teacher"), "qwen2")
    teacher = CausalLM.from_pretrained(path)
    return {"lrc": LowRankClone(teacher, LRCConfig(32)), "kd": KnowledgeDistillation(student_like(teacher, 32, 0), teacher),
            "lm": KnowledgeDistillation(student_like(teacher, 32, 0))}


def accepts(impl: inspect.Signature, spec: inspect.Signature) -> bool:
    """`impl` can be called as `spec` says: the same parameters (name, kind, default) in order;
    any more only with a default or as *args / **kwargs."""
    ours, theirs = list(impl.parameters.values()), list(spec.parameters.values())
    same = [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    extra = ours[len(theirs):]
    return same and all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in extra)


@pytest.mark.parametrize("cls", [LowRankClone, KnowledgeDistillation])
def test_both_model_classes_provide_the_interface(cls, models):
    assert {"vocab_size", "forward", "student_parts", "export_extras", "leaf_module_classes"} <= set(MEMBERS)
    for name in MEMBERS:
        spec = inspect.getattr_static(DistillationModel, name, None)
        ours = inspect.getattr_static(cls, name, None)
        if isinstance(spec, property):
            assert isinstance(ours, property), f"{cls.__name__}.{name} is not a property"
        elif callable(spec):
            assert callable(ours), f"{cls.__name__} has no method {name}"
            assert accepts(inspect.signature(ours), inspect.signature(spec)), \
                f"{cls.__name__}.{name}{inspect.signature(ours)} does not take {name}{inspect.signature(spec)}"
    for instance in (m for m in models.values() if type(m) is cls):
        assert isinstance(instance, DistillationModel) and isinstance(instance, nn.Module)
        assert all(issubclass(c, nn.Module) for c in instance.leaf_module_classes)
        assert isinstance(instance.cross_tokenizer, bool) and instance.dual_space is None
    assert not isinstance(nn.Linear(2, 2), DistillationModel)


def test_users_see_only_the_interface():
    """No user of the model but build.py (the factory) names a model class, none asks whether it
    holds one (isinstance), and every attribute they read of `model` is the interface's or any
    nn.Module's."""
    allowed = set(MEMBERS) | set(dir(nn.Module))
    for name in USERS:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if name != "build.py":
                named = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
                imported = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
                for n in [named, *imported]:
                    assert n not in ("LowRankClone", "KnowledgeDistillation"), f"{name}:{node.lineno} names {n}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
                classes = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.args[1])
                           if isinstance(n, ast.Name | ast.Attribute)}
                assert not classes & set(MODEL_CLASSES), f"{name}:{node.lineno} asks {ast.unparse(node)}"
            if name != "build.py" and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "model":
                assert node.attr in allowed, f"{name}:{node.lineno} reads model.{node.attr}, which interface.py lacks"


def test_the_interface_imports_nothing_of_lrc_dist():
    """Imports go one way: the models and their users import interface.py, never the reverse."""
    code = "import sys, lrc_dist.interface; print(sorted(m for m in sys.modules if m.startswith('lrc_dist.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lrc_dist.interface']"

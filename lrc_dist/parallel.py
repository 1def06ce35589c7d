"""Distributed backends: FSDP2 (`fully_shard`), DeepSpeed ZeRO, or one plain process.

Each backend wraps a distillation model (`interface.DistillationModel`) behind one small interface
the trainer uses: call the model, `backward` (or `skip_micro` for a non-finite loss), `step` (clip
+ optimizer) or `skip_step`, `set_lr`, checkpoint `save`/`load`, and `gathered` for exports (the
full values of some parameters, one part of the model at a time). The model names its units of
sharding (`shard_units`: for LRC the `LowRankBlock`, i.e. frozen teacher layer + its projections +
student norms), the modules ZeRO-3 must gather whole (`leaf_module_classes`) and the weights its
root forward reads directly (`external_params`: the heads).
Gradients are *summed* over micro-batches and ranks: the loss is pre-divided by the global token
count (see losses.py), so the trainer multiplies it by the world size to undo the backends' mean.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from lrc_dist.build import dtype_of
from lrc_dist.config import TrainConfig
from lrc_dist.interface import DistillationModel
from lrc_dist.losses import compile_kernels
from lrc_dist.resources import shipped


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object | None = None
    """FSDP2's device mesh, when made beforehand (lrc_dist.plan: outside its fake tensor mode)"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job, or start a one-process group so the same code runs everywhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for a private single-process rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model: DistillationModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, a group per `model.param_group` (the student; the DSKD
    projector; LRC's dense-phase matrices), whose `lr_scale` multiplies the schedule's lr."""
    o = cfg.optim
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group, scale = model.param_group(name)
            groups.setdefault(group, {"params": [], "lr_scale": scale})["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class TorchBackend:
    """FSDP2-sharded (`backend: fsdp`) or plain (`backend: none`) model; DCP checkpoints for both."""

    def __init__(self, model: DistillationModel, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        model.set_activation_checkpointing(cfg.parallel.activation_checkpointing)
        maybe_compile(model, cfg)
        if any(t.device != info.device for t in (*model.parameters(), *model.buffers())):
            model.to(info.device)  # (a no-op .to would still swap every tensor: the planner's fakes refuse)
        self.placement = "one process, nothing sharded"  # for the start-up summary
        self.generation_group = None
        if cfg.parallel.backend == "fsdp":
            replicated = shard_fsdp(model, cfg, info)
            self.placement = f"trainable state sharded, teacher {'replicated' if replicated else 'sharded'}"
            self.generation_group = maybe_shard_generation(model, cfg, info)
        self.model = model
        self.params = trainable(model)
        self.optimizer = adamw(model, cfg)
        self.state_options = StateDictOptions(ignore_frozen_params=True)  # the teacher is never saved

    def close(self) -> None:
        """Drop the model and optimizer before another backend is built (the dense phase's switch)."""
        self.model = self.optimizer = self.params = None
        close_group(self.generation_group)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        return self.clip_and_step().item()

    def clip_and_step(self) -> torch.Tensor:
        """`step` short of reading the gradient norm's value (the planner's fake tensors have none)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip or float("inf"), foreach=True)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_micro(self, loss: torch.Tensor) -> None:
        """A micro-batch with a non-finite loss: no backward (`skip_step` drops the step's gradients)."""

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))  # reshards: the world size may differ from the save
        # strict=False: the teacher is absent by design; DCP's load above already failed on any
        # trainable tensor missing from the checkpoint.
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)

    def gathered(self, names: list[str]) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        """The full values of the parameters `names` (`full_tensors`; collective under FSDP)."""
        return full_tensors(self.model, names)


@contextlib.contextmanager
def full_tensors(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """{name: full value} of the parameters `names` of `model` (as in `named_parameters`), on their
    device and in their dtype: FSDP2's shards all-gathered (every rank calls, with the same names),
    other tensors as they are."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        yield {n: params[n].full_tensor() if isinstance(params[n], DTensor) else params[n].detach() for n in names}


def teacher_fits(model: DistillationModel, info: DistInfo) -> bool:
    """Replicating the teacher saves an all-gather per layer; do it when it takes < 1/4 of memory."""
    teacher_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    if info.device.type == "cuda":
        total = torch.cuda.get_device_properties(info.device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return teacher_bytes < total // 4


def sharded_matmul(x: torch.Tensor, p: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x @ p, computed 1/world of the rows per rank and all-gathered: LRC's weight generation
    shared out (`parallel.shard_generation`), its FLOPs divided by the world size.

    The gather's backward reduce-scatters (sums) the gradient, so a rank's P gradient covers its
    rows for the whole group's data; the backend's data-parallel reduction of P's gradient then
    sums the ranks' rows. The result equals every rank generating every row from its own data.
    That reduce-scatter runs in the dtype of the generated weights (bf16 in bf16 training).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = -(-x.shape[0] // world)
    local = x[rank * rows : (rank + 1) * rows] @ p
    if local.shape[0] < rows:  # the last ranks' slices may be short
        local = F.pad(local, (0, 0, 0, rows - local.shape[0]))
    full = funcol.all_gather_single(local, 0, group)
    return full if full.shape[0] == x.shape[0] else full[: x.shape[0]]


def maybe_compile(model: DistillationModel, cfg: TrainConfig) -> None:
    """`parallel.compile`: each shard unit's forward (an LRC block, a KD layer) becomes a
    torch.compile'd function, in place, and so do the head losses' kernels (losses.compile_kernels). Called once activation checkpointing is set (the block's
    own checkpoint call is traced with it) and before fully_shard, as torchtitan orders them.
    Compiling the forward rather than wrapping the module keeps the parameter names (checkpoints,
    exports) and leaves FSDP2's and ZeRO's module hooks outside the compiled code."""
    if cfg.parallel.compile:
        compile_kernels()  # the head losses' per-chunk kernels too
        for unit in model.shard_units():
            if "forward" not in vars(unit):  # not compiled yet (the dense phase builds its backend again)
                unit.forward = torch.compile(unit.forward)


def maybe_shard_generation(model: DistillationModel, cfg: TrainConfig, info: DistInfo) -> dist.ProcessGroup | None:
    """`parallel.shard_generation`: the ranks share out LRC's weight generation, on a process group
    of their own (every rank creates it, in the same order); returns it. Not in LRC's dense
    phase, which generates no weights."""
    if cfg.parallel.shard_generation and info.world_size > 1 and not model.dense:
        group = dist.new_group()
        model.set_generation_matmul(functools.partial(sharded_matmul, group=group), info.world_size)
        return group
    return None


def close_group(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.destroy_process_group(group)


def shard_fsdp(model: DistillationModel, cfg: TrainConfig, info: DistInfo) -> bool:
    """FSDP2 over the model's shard units; returns whether the teacher stays replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mode = cfg.parallel.teacher
    if mode not in ("auto", "shard", "replicate"):
        raise ValueError(f"parallel.teacher={mode!r}; use auto, shard or replicate.")
    replicate = mode == "replicate" or (mode == "auto" and teacher_fits(model, info))
    mesh = info.mesh or init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=dtype_of(cfg.parallel.param_dtype), reduce_dtype=dtype_of(cfg.parallel.reduce_dtype))

    def frozen(module: nn.Module) -> set[nn.Parameter] | None:
        return {p for p in module.parameters() if not p.requires_grad} if replicate else None

    for unit in model.shard_units():
        if replicate and not any(p.requires_grad for p in unit.parameters()):
            continue  # a frozen teacher layer, replicated: nothing of it to shard
        fully_shard(unit, mesh=mesh, mp_policy=mp, ignored_params=frozen(unit))
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen(model))
    return replicate


class DeepSpeedBackend:
    """DeepSpeed ZeRO (stage and offload from the JSON config); blocks are ZeRO-3 leaf modules."""

    def __init__(self, model: DistillationModel, cfg: TrainConfig, info: DistInfo, grad_accum: int):
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        self.cfg, self.info = cfg, info
        if info.device.type == "cpu":
            # On a CPU, DeepSpeed's communication set-up JIT-compiles its shared-memory all-reduce
            # (C++, about a minute in a fresh environment), which only its inference_all_reduce
            # uses; training never calls it. Marked unavailable, DeepSpeed uses gloo throughout.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_config = deepspeed_config(cfg, grad_accum)
        self.placement = f"ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}"
        model.set_activation_checkpointing(cfg.parallel.activation_checkpointing)
        maybe_compile(model, cfg)
        if ds_config["zero_optimization"].get("stage", 0) == 3:
            # Gather a whole block at once: its forward reads the weights of child modules directly
            # (LRC: W_T @ P), which ZeRO-3's per-module hooks would otherwise never fetch.
            set_z3_leaf_modules(model, list(model.leaf_module_classes))
            for weight in model.external_params():
                deepspeed.zero.register_external_parameter(model, weight)
        self.generation_group = maybe_shard_generation(model, cfg, info)
        optimizer = adamw(model, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine

    def close(self) -> None:
        """Release the engine (its hooks and partitions) before another backend is built."""
        self.engine.destroy()
        self.engine = self.model = self.optimizer = None
        close_group(self.generation_group)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised globally
        self.engine.step()  # DeepSpeed steps the optimizer itself at the accumulation boundary

    def step(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def skip_micro(self, loss: torch.Tensor) -> None:
        # DeepSpeed's own skip: at the accumulation boundary, a non-finite gradient norm makes its
        # optimizer drop the step (gradients cleared; weights and Adam state untouched). A NaN
        # gradient seed guarantees one, and keeps DeepSpeed's micro-step count in line with ours.
        self.engine.backward(loss * float("nan"), scale_wrt_gas=False)
        self.engine.step()

    def skip_step(self) -> None:
        """Nothing left to undo: `skip_micro` made DeepSpeed discard the step."""

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="state", save_latest=False, exclude_frozen_parameters=True)

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="state", load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}.")

    @contextlib.contextmanager
    def gathered(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """{name: full value} of the module's parameters `names` (ZeRO-3's partitions gathered on every
        rank: every rank calls, with the same names). A trainable one is its fp32 master (in bf16
        DeepSpeed casts the module's copy, which would round what an export or the dense phase's
        switch starts from), as FSDP2 gives it; a frozen one is the module's, in its dtype."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None), torch.no_grad():
            full = {}
            for n in names:
                master = safe_get_full_fp32_param(params[n]) if params[n].requires_grad else None
                full[n] = params[n].detach() if master is None else master.view(params[n].shape)
            yield full


def deepspeed_config(cfg: TrainConfig, grad_accum: int) -> dict:
    """The JSON config with every "auto" filled from the training config."""
    path = shipped(cfg.parallel.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"parallel.deepspeed_config={path} does not exist; see ds_configs/.")
    ds = json.loads(path.read_text())
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=cfg.global_batch_size,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**9,
    )
    bf16 = dtype_of(cfg.model.dtype) == torch.bfloat16
    ds.setdefault("zero_optimization", {})
    # DeepSpeedBackend.skip_micro relies on ZeRO's optimizer dropping a step whose gradient norm
    # is not finite: it needs a ZeRO stage, the norm, and in bf16 the overflow check.
    zero = ds["zero_optimization"]
    if zero.get("stage", 0) < 1 or zero.get("compute_grad_norm") is False:
        raise ValueError(f"{path}: lrc_dist needs zero_optimization.stage >= 1 with compute_grad_norm on, so that "
                         f"a step with a non-finite loss can be skipped; see ds_configs/.")
    ds["bf16"] = {"enabled": bf16, "check_grad_overflow": True}
    ds["zero_force_ds_cpu_optimizer"] = False  # plain torch AdamW: no cpu_adam compile
    return ds


def build_backend(model: DistillationModel, cfg: TrainConfig, info: DistInfo, grad_accum: int):
    backend = cfg.parallel.backend
    if backend in ("fsdp", "none"):
        if backend == "none" and info.world_size > 1:
            raise ValueError("parallel.backend=none runs one process; use fsdp or deepspeed under torchrun.")
        return TorchBackend(model, cfg, info)
    if backend == "deepspeed":
        return DeepSpeedBackend(model, cfg, info, grad_accum)
    raise ValueError(f"parallel.backend={backend!r}; use fsdp, deepspeed or none.")

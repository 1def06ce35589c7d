"""Plan a run before booking the cluster: peak memory per rank and tokens/s for each way of laying it out.

    python -m lrc_dist.plan configs/lrc_qwen7b.yaml --nodes 4 --gpus-per-node 8 --gpu-memory-gb 80
    python -m lrc_dist.plan configs/lrc_llama3b.yaml --nodes 1 --gpus-per-node 8 --gpu-memory-gb 80 --json
    python -m lrc_dist.plan configs/lrc_qwen7b.yaml --nodes 1 --gpus-per-node 1 --gpu-memory-gb 80 --data.seq_len=4096

Any other `--key=value` is a training-config override, as for `lrc_dist.train`.

For each candidate layout (FSDP2 with the teacher replicated or sharded, activation checkpointing on
or off, `parallel.shard_generation`, each micro-batch size that divides the global batch), the
planner builds the config's model at its real widths without allocating it (FakeTensorMode: tensors
with shapes and no data), lays it out with the trainer's own backend (`parallel.TorchBackend`:
`fully_shard` per block, the teacher's placement, the mixed-precision policy) on a fake process
group of the job's world size, and runs one training step on it (forward with the loss, backward,
gradient clipping, the AdamW step, its state already in place as from the second step on) under
`torch.distributed._tools`' FSDPMemTracker, which accounts every tensor rank 0 holds by category.

Depth. The tracker's cost grows with the square of the model's depth (it visits every module at
every op), so the step runs at two depths, 2 and 3 layers, and each category is extrapolated
linearly to the teacher's depth: every layer holds the same parameters, gradients, optimizer
state and saved activations, and the peak falls at the same point of the step (the end of the
forward, or the first block's backward). `--full-depth` runs the real depth instead (about 20 s
per layout at 28 layers, against 4 s); tests/test_plan.py and bench/RESULTS.md compare the two.

Margins (`fits`): the tracker counts tensor bytes. On a GPU the CUDA caching allocator rounds each
block up (to 512 B, and blocks above 1 MiB to multiples of 2 MiB carved from 20 MiB+ segments) and
fragments over a run; CUDA's context, cuBLAS/NCCL workspaces and the communication buffers take
memory no tensor accounts for. A candidate fits when peak * (1 + `--fragmentation`, default 0.10)
+ `--reserve-gb` (default 3) <= `--gpu-memory-gb`. bench/gpu_check.sh measures the real peak
(torch.cuda.max_memory_allocated) next to this prediction on a GPU.

Throughput is predicted, not measured: a step of a micro-batch takes the longer of its compute
(the FLOPs it executes, recompute included, at `--mfu` of `--peak-tflops`) and its communication
(FSDP2's all-gathers and reduce-scatters at `--bandwidth-gbs` per GPU, assumed overlapped). MFU is
reported the conventional way (model FLOPs, recompute not counted). DeepSpeed is not planned: ZeRO's
partitioning allocates through its own hooks, which a fake-tensor step does not reproduce.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lrc_dist.build import dtype_of
from lrc_dist.config import ConfigError, TrainConfig, parse_args
from lrc_dist.families import ModelArgs
from lrc_dist.losses import chunk_tokens
from lrc_dist.lrc import LowRankClone
from lrc_dist.metrics import forward_flops_per_token, lrc_flops_per_token, projects_head
from lrc_dist.model import CausalLM, CheckpointError, load_checked, load_config
from lrc_dist.resources import PACKAGE

GiB = 2**30
TEACHERS = PACKAGE / "assets" / "teachers"  # config.json of the recipes' teachers (no weights)
DEPTHS = (2, 3)  # the depths the step runs at, extrapolated linearly to the teacher's
CATEGORIES = ("teacher", "params", "grads", "optimizer", "activations", "gathered", "temporaries", "inputs")


@dataclass(frozen=True)
class Candidate:
    backend: str
    teacher: str  # "replicate" or "shard"
    activation_checkpointing: bool
    micro_batch_size: int
    shard_generation: bool

    def overrides(self) -> list[str]:
        """The training-config overrides that select this layout."""
        return [f"--parallel.backend={self.backend}", f"--parallel.teacher={self.teacher}",
                f"--parallel.activation_checkpointing={str(self.activation_checkpointing).lower()}",
                f"--parallel.shard_generation={str(self.shard_generation).lower()}",
                f"--micro_batch_size={self.micro_batch_size}"]

    def label(self) -> str:
        return (f"teacher {self.teacher:9s} AC {'on ' if self.activation_checkpointing else 'off'} "
                f"shard_gen {'on ' if self.shard_generation else 'off'} micro {self.micro_batch_size:2d}")


def teacher_config(cfg: TrainConfig):
    """The teacher's HF config: from model.teacher, or the shipped copy of a recipe teacher of that name."""
    path = Path(cfg.model.teacher)
    if (path / "config.json").is_file():
        return load_config(path), str(path / "config.json")
    if (TEACHERS / path.name / "config.json").is_file():
        return load_config(TEACHERS / path.name), f"{path.name} (shipped config.json, lrc_dist/assets/teachers)"
    raise ConfigError(f"model.teacher={cfg.model.teacher or '(unset)'}: no config.json there, and no shipped shape of "
                      f"that name ({', '.join(sorted(p.name for p in TEACHERS.iterdir() if p.is_dir()))}); pass "
                      f"--model.teacher=DIR, a directory with the teacher's config.json (weights are not needed)")


def at_depth(hf_config, depth: int | None):
    """`hf_config` with its first `depth` layers (None: all)."""
    if depth is None or depth >= hf_config.num_hidden_layers:
        return hf_config
    new = copy.deepcopy(hf_config)
    new.num_hidden_layers = depth
    if getattr(new, "layer_types", None):
        new.layer_types = new.layer_types[:depth]
    return new


def peak_tracker(model: nn.Module, optimizer: torch.optim.Optimizer):
    """FSDPMemTracker keeping only the global peak snapshot: the per-module peaks it also keeps
    visit every module at every op, which makes a deep model's step slow (bench/RESULTS.md)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PeakTracker(FSDPMemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker(model, optimizer)


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor: its local shard)."""
    return sum(getattr(t, "_local_tensor", t).numel() * t.element_size() for t in tensors)


def _model(cfg: TrainConfig, hf_config, device: torch.device) -> LowRankClone:
    """The LRC model of `cfg` over a teacher of `hf_config`, its tensors made in the current mode
    (fake, or real and uninitialised), the projections randomly initialised."""
    dtype = dtype_of(cfg.model.dtype)
    with torch.device("meta"):
        teacher = CausalLM(ModelArgs.from_hf(hf_config), hf_config)
    load_checked(teacher, {k: torch.zeros(v.shape, dtype=dtype, device=device)
                           for k, v in teacher.state_dict().items()}, "the planned teacher")
    with torch.device(device):
        model = LowRankClone(teacher, cfg.model.lrc)
    model.init_weights(cfg.seed)
    if cfg.data.document_mask:
        model.set_document_mask(0)
    if cfg.loss.dskd_weight:
        model.enable_dual_space()
    return model


def apply(cfg: TrainConfig, cand: Candidate, vocab: int) -> TrainConfig:
    """`cfg` laid out as `cand`, its head loss chunked as on a GPU (a CPU's chunks are smaller), run
    eagerly (`parallel.compile` is planned as the eager blocks' memory; not measured compiled)."""
    cfg = copy.deepcopy(cfg)
    cfg.loss.chunk_tokens = chunk_tokens(cfg.loss, vocab, torch.device("cuda"))
    cfg.parallel.compile = False
    cfg.parallel.backend, cfg.parallel.teacher = cand.backend, cand.teacher
    cfg.parallel.activation_checkpointing = cand.activation_checkpointing
    cfg.parallel.shard_generation = cand.shard_generation
    cfg.micro_batch_size = cand.micro_batch_size
    return cfg


def measure(cfg: TrainConfig, hf_config, cand: Candidate, depth: int | None, fake: bool = True) -> dict[str, int]:
    """Peak bytes per category of rank 0 (or this rank, `fake=False`) in one training step of `cand`
    on the process group in place, the model cut to `depth` layers. `fake`: FakeTensorMode, else
    real (zero) tensors on the CPU: the validation run (tests/test_plan.py). The step is
    `train.take_step`'s for one micro-batch (the backend's model call, backward, `clip_and_step`)
    without its reads of the loss's and the norm's values, which fake tensors do not have."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh

    from lrc_dist.parallel import DistInfo, TorchBackend

    cfg = apply(cfg, cand, hf_config.vocab_size)
    device, world = torch.device("cpu"), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))  # outside the fake mode
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = _model(cfg, at_depth(hf_config, depth), device)
        backend = TorchBackend(model, cfg, DistInfo(dist.get_rank(), world, 0, device, mesh))
        for p in backend.params:  # the AdamW state as from the second step on
            p.grad = torch.zeros_like(p)
        backend.optimizer.step()
        backend.optimizer.zero_grad(set_to_none=True)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        teacher, params = local_bytes(frozen), local_bytes(backend.params)
        seq = cfg.data.seq_len
        ids = torch.randint(0, model.vocab_size, (cand.micro_batch_size, seq), device=device)
        tracker = peak_tracker(backend.model, backend.optimizer)
        replicated = [p for p in frozen if not hasattr(p, "_local_tensor")]  # not FSDP's: the tracker must be told
        tracker.track_inputs((ids, *replicated))
        with tracker:
            loss, _ = backend.model(input_ids=ids, labels=ids, loss_cfg=cfg.loss,
                                    normalizer=float(cand.micro_batch_size * seq * world))
            backend.backward(loss * world)
            backend.clip_and_step()
        backend.close()
    snap = {str(getattr(k, "value", k)): v for k, v in tracker.get_tracker_snapshot("peak")[device].items()}
    get = lambda *names: sum(int(snap.get(n, 0)) for n in names)  # noqa: E731
    resident = get("Sharded Param", "Buffer", "Inputs")
    out = {"teacher": teacher, "params": params,
           "grads": get("Sharded Grad", "Unsharded Grad"),
           "optimizer": get("OptState"),
           "activations": get("Activation"),
           "gathered": get("Unsharded Param", "All Gather", "Reduce Scatter"),
           "temporaries": get("Temp"),
           "total": get("Total")}
    out["inputs"] = max(0, resident - teacher - params)
    return out


def extrapolate(at: dict[int, dict[str, int]], layers: int) -> dict[str, int]:
    """Each category linearly from the two depths measured to `layers`."""
    (d1, a), (d2, b) = sorted(at.items())
    return {k: max(0, round(a[k] + (b[k] - a[k]) * (layers - d1) / (d2 - d1))) for k in a}


# ---- throughput ---------------------------------------------------------------------------------

def throughput(cfg: TrainConfig, args: ModelArgs, cand: Candidate, world: int, peak: dict[str, int],
               peak_flops: float, mfu: float, bandwidth: float) -> dict[str, float]:
    """Predicted tokens/s per GPU and MFU of `cand` (see the module's doc for the model); `peak`:
    its bytes per category, whose teacher and params give the sizes of what FSDP2 moves."""
    seq, d_s = cfg.data.seq_len, cfg.model.lrc.student_hidden_size
    tokens = cand.micro_batch_size * seq
    ranks = world if cand.shard_generation and world > 1 else 1
    project = projects_head(cfg.model.lrc.head_logits, args.vocab_size, args.hidden_size, d_s, tokens * ranks)
    model_flops = lrc_flops_per_token(args, d_s, seq, tokens, ranks, project_head=project) * tokens
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    heads = (1 if args.tie_word_embeddings else 2) - project  # a projected head is not generated
    layer_weights = args.num_layers * d_s * (2 * q + 2 * kv + 3 * args.intermediate_size)
    student_weights = layer_weights + heads * args.vocab_size * d_s  # what W_T @ P generates
    recompute = 0.0
    if cand.activation_checkpointing:  # the student's layers again, their weights generated again
        student = dataclasses.replace(args, hidden_size=d_s, vocab_size=0)
        recompute = forward_flops_per_token(student, seq) * tokens + 2 * args.hidden_size * layer_weights / ranks
    compute_s = (model_flops + recompute) / (mfu * peak_flops)
    # bytes each GPU sends per micro-batch: ring collectives move (world - 1) / world of each tensor
    trainable = peak["params"] * world / 4  # fp32 masters, sharded
    teacher = peak["teacher"] * (world if cand.teacher == "shard" else 1) / dtype_of(cfg.model.dtype).itemsize
    passes = 2 + cand.activation_checkpointing  # forward, backward (and the recompute) gather again
    sent = trainable * (2 * 2 + 4)  # bf16 all-gathers in forward and backward, an fp32 reduce-scatter
    if cand.teacher == "shard":
        sent += teacher * 2 * passes
    if ranks > 1:  # the generated weights all-gathered, their gradient reduce-scattered
        sent += student_weights * 2 * passes
    comm_s = (world - 1) / world * sent / bandwidth
    per_gpu = tokens / max(compute_s, comm_s)
    return {"tokens_per_s_per_gpu": per_gpu, "mfu": per_gpu * model_flops / tokens / peak_flops,
            "compute_s": compute_s, "comm_s": comm_s}


# ---- candidates and the recommendation ------------------------------------------------------------

def micro_batch_sizes(cfg: TrainConfig, world: int) -> list[int]:
    per_rank = cfg.global_batch_size // world if cfg.global_batch_size % world == 0 else 0
    return [m for m in (1, 2, 4, 8, 16, 32) if m <= per_rank and per_rank % m == 0]


@dataclass
class Grid:
    """The layouts to try (each None: all that apply)."""

    teacher: tuple[str, ...] | None = None
    activation_checkpointing: tuple[bool, ...] | None = None
    shard_generation: tuple[bool, ...] | None = None
    micro_batch_sizes: tuple[int, ...] | None = None

    def combos(self, world: int) -> list[tuple[str, bool, bool]]:
        teachers = self.teacher or (("replicate", "shard") if world > 1 else ("replicate",))
        shard_gen = self.shard_generation or ((False, True) if world > 1 else (False,))
        checkpointing = self.activation_checkpointing or (True, False)
        return [(t, ac, sg) for t in teachers for ac in checkpointing for sg in shard_gen]


def plan(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu_memory_gb: float, fragmentation: float = 0.10,
         reserve_gb: float = 3.0, mfu: float = 0.40, peak_tflops: float = 989.0, bandwidth_gbs: float | None = None,
         full_depth: bool = False, grid: Grid | None = None, progress=None) -> dict:
    """Every candidate's peak memory per category (GiB), fit and predicted speed, and the recommendation."""
    grid = grid or Grid()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = nodes * gpus_per_node
    if cfg.model.method != "lrc" or cfg.model.cross_tokenizer() or cfg.model.lrc.dense_after is not None:
        raise ConfigError("the planner models LRC in the teacher's vocabulary (model.method=lrc, no model.student, "
                          "no model.lrc.dense_after); plan that and add the difference by hand")
    sizes = micro_batch_sizes(cfg, world)
    if grid.micro_batch_sizes:
        wrong = [m for m in grid.micro_batch_sizes if m not in sizes]
        if wrong and sizes:
            raise ConfigError(f"--micro-batch-sizes {wrong}: with global_batch_size={cfg.global_batch_size} on {world} "
                              f"GPUs a micro-batch size must divide {cfg.global_batch_size // world}: one of {sizes}")
        sizes = list(grid.micro_batch_sizes)
    if not sizes:
        fix = -(-cfg.global_batch_size // world) * world
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} cannot be split over {world} GPUs (each needs "
                          f"a whole number of sequences): pass --global_batch_size={fix} (or another multiple of "
                          f"{world})")
    hf_config, source = teacher_config(cfg)
    args = ModelArgs.from_hf(hf_config, source)
    bandwidth = (bandwidth_gbs or (300.0 if nodes == 1 else 40.0)) * 1e9
    if dist.is_initialized():
        raise RuntimeError("lrc_dist.plan runs in a process of its own (it starts a fake process group)")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    started = time.perf_counter()
    candidates = []
    try:
        for teacher, ac, sg in grid.combos(world):
            for m in sizes:
                cand = Candidate("fsdp", teacher, ac, m, sg)
                depths = (None,) if full_depth or args.num_layers <= max(DEPTHS) else DEPTHS
                measured = {d or args.num_layers: measure(cfg, hf_config, cand, d) for d in depths}
                peak = measured[args.num_layers] if len(measured) == 1 else extrapolate(measured, args.num_layers)
                gb = {k: peak[k] / GiB for k in (*CATEGORIES, "total")}
                need = gb["total"] * (1 + fragmentation) + reserve_gb
                row = {**dataclasses.asdict(cand), "peak_gb": gb, "needs_gb": need, "fits": need <= gpu_memory_gb,
                       **throughput(cfg, args, cand, world, peak, peak_tflops * 1e12, mfu, bandwidth)}
                candidates.append(row)
                if progress:
                    progress(row, time.perf_counter() - started)
                if not row["fits"]:
                    break  # a larger micro-batch holds more
    finally:
        dist.destroy_process_group()
    fitting = [c for c in candidates if c["fits"]]
    # the fastest; among equals the one that communicates least (its speed depends least on the
    # overlap assumed), then the one with the most memory to spare
    best = max(fitting, key=lambda c: (round(c["tokens_per_s_per_gpu"], -1), -round(c["comm_s"], 3), -c["needs_gb"]),
               default=None)
    notes = ["deepspeed: not planned (ZeRO allocates through its own partitioning hooks, which a fake-tensor step "
             "does not run); expect about the fsdp candidates with the teacher sharded"]
    return {"world_size": world, "nodes": nodes, "gpus_per_node": gpus_per_node, "gpu_memory_gb": gpu_memory_gb,
            "teacher": source, "layers": args.num_layers, "depths_run": "full" if full_depth else list(DEPTHS),
            "assumptions": {"fragmentation": fragmentation, "reserve_gb": reserve_gb, "mfu": mfu,
                            "peak_tflops": peak_tflops, "bandwidth_gbs": bandwidth / 1e9},
            "candidates": candidates, "recommended": best, "notes": notes,
            "seconds": time.perf_counter() - started}


def _line(row: dict) -> str:
    gb = row["peak_gb"]
    cats = " ".join(f"{gb[k]:5.1f}" for k in CATEGORIES)
    return (f"{Candidate(**{k: row[k] for k in Candidate.__dataclass_fields__}).label()} | {cats} | {gb['total']:6.1f} "
            f"{row['needs_gb']:6.1f} {'yes' if row['fits'] else 'NO ':3s} | {row['tokens_per_s_per_gpu']:8,.0f} "
            f"{row['mfu']:5.1%}")


def report(result: dict) -> str:
    a = result["assumptions"]
    width = len(Candidate("fsdp", "replicate", True, 1, True).label())
    head = (f"{'layout':{width}s} | {' '.join(f'{k[:5]:>5s}' for k in CATEGORIES)} | {'peak':>6s} {'needs':>6s} fits | "
            f"{'tok/s/GPU':>8s} {'MFU':>5s}")
    lines = [f"plan: {result['nodes']} node(s) x {result['gpus_per_node']} GPU(s) of {result['gpu_memory_gb']:g} GB; "
             f"teacher {result['teacher']}, {result['layers']} layers (run at depths {result['depths_run']}, "
             f"extrapolated)", "peak memory per rank in GiB by category; needs = peak * "
             f"(1 + {a['fragmentation']:g}) + {a['reserve_gb']:g} GB reserve; speed predicted at MFU {a['mfu']:g} of "
             f"{a['peak_tflops']:g} TFLOP/s and {a['bandwidth_gbs']:g} GB/s per GPU", head, "-" * len(head)]
    lines += [_line(r) for r in result["candidates"]]
    best = result["recommended"]
    if best is None:
        lines.append("recommended: none fits. Use more GPUs (the teacher and the trainable state shard over them), "
                     "or a shorter data.seq_len.")
    else:
        cand = Candidate(**{k: best[k] for k in Candidate.__dataclass_fields__})
        lines.append(f"recommended: {cand.label()} -> {best['needs_gb']:.1f} of {result['gpu_memory_gb']:g} GB, "
                     f"{best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU")
        lines.append("  overrides: " + " ".join(cand.overrides()))
    lines += [f"note: {n}" for n in result["notes"]]
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lrc_dist.plan", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False,  # --micro_batch_size=2 is a config override
                                     epilog="Any other --key=value is a training-config override (see "
                                            "python -m lrc_dist.train --help). Method and margins: the module's "
                                            "doc (python -m pydoc lrc_dist.plan).")
    parser.add_argument("config", help="the training config (YAML recipe), as for lrc_dist.train")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", "--gpus_per_node", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", "--gpu_memory_gb", type=float, required=True,
                        help="memory of one GPU, e.g. 80 for an H100-80GB")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--fragmentation", type=float, default=0.10, help="allocator margin on the peak (0.10)")
    parser.add_argument("--reserve-gb", "--reserve_gb", type=float, default=3.0,
                        help="memory no tensor accounts for: CUDA context, cuBLAS/NCCL workspaces (3)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed utilisation of the peak FLOP/s (0.40)")
    parser.add_argument("--peak-tflops", "--peak_tflops", type=float, default=989.0,
                        help="dense bf16 TFLOP/s per GPU (989: H100/H200)")
    parser.add_argument("--bandwidth-gbs", "--bandwidth_gbs", type=float, default=None,
                        help="collective bandwidth per GPU in GB/s (300 within a node, 40 across nodes)")
    parser.add_argument("--teacher", choices=("replicate", "shard"), nargs="+", help="try only these placements")
    parser.add_argument("--activation-checkpointing", "--activation_checkpointing", choices=("on", "off"), nargs="+",
                        help="try only these")
    parser.add_argument("--shard-generation", "--shard_generation", choices=("on", "off"), nargs="+",
                        help="try only these")
    parser.add_argument("--micro-batch-sizes", "--micro_batch_sizes", type=int, nargs="+",
                        help="try only these (default: each that divides the global batch per GPU, up to 32)")
    parser.add_argument("--full-depth", "--full_depth", action="store_true",
                        help="run the step at the teacher's full depth instead of extrapolating (slow)")
    ns, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        cfg = parse_args([ns.config, *overrides])
        def progress(row: dict, seconds: float) -> None:
            print(f"  [{seconds:5.0f} s] {_line(row)}", file=sys.stderr, flush=True)

        onoff = lambda v: tuple(x == "on" for x in v) if v else None  # noqa: E731
        grid = Grid(tuple(ns.teacher) if ns.teacher else None, onoff(ns.activation_checkpointing),
                    onoff(ns.shard_generation), tuple(ns.micro_batch_sizes) if ns.micro_batch_sizes else None)
        result = plan(cfg, ns.nodes, ns.gpus_per_node, ns.gpu_memory_gb, ns.fragmentation, ns.reserve_gb, ns.mfu,
                      ns.peak_tflops, ns.bandwidth_gbs, ns.full_depth, grid, None if ns.json else progress)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1) if ns.json else report(result))


if __name__ == "__main__":
    main()

"""Atomic, verified, resumable checkpoints.

Layout under `checkpoint.dir` (a filesystem every rank sees):

    step_00000500/          a complete checkpoint: the backend's files (DCP or DeepSpeed) plus
        rng.pt              rank 0's RNG states
        train_state.json    step, consumed_samples, bad_steps, the world size, the last logged
                            metrics, the config it was written with, and the size and blake2b
                            checksum of every other file in the directory; written last
    latest                  the name of the newest complete checkpoint
    step_00000400.damaged/  a checkpoint that failed verification, moved aside at resume

A checkpoint is written to `step_N.tmp/`, renamed to `step_N/` only when every rank has finished,
and only then does `latest` (itself replaced atomically) point at it. A crash at any moment leaves
`latest` naming a complete checkpoint. At resume every file is checked against train_state.json;
a damaged checkpoint is moved aside with a warning naming the file, and the newest intact one is
used instead. The teacher's weights are never saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from lrc_dist.indexed_dataset import file_digest, fsync_dir

TRAIN_STATE, RNG_STATE, LATEST = "train_state.json", "rng.pt", "latest"


class CheckpointDamaged(RuntimeError):
    pass


def write_atomic(path: Path, text: str) -> None:
    """`path` keeps its old content or holds all of the new one, also across a power loss."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _gathered(items: dict) -> dict:
    """The union of every rank's dict (collective)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return {k: v for part in parts for k, v in part.items()}


def file_table(root: Path) -> dict[str, list]:
    """{relative path: [size, blake2b digest]} of every file under `root` (collective: each rank
    reads a share of the files)."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != TRAIN_STATE)
    rank, world = dist.get_rank(), dist.get_world_size()
    return _gathered({f: [(root / f).stat().st_size, file_digest(root / f)] for f in files[rank::world]})


def read_train_state(path: str | Path) -> dict:
    """The train_state.json of a checkpoint directory, with an error naming the file."""
    file = Path(path) / TRAIN_STATE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(f"{file} is missing: {path} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"{file} is corrupt ({e})") from None


def damage(path: Path, state: dict, rank: int, world: int) -> dict[str, str]:
    """{file: what is wrong} for this rank's share of the files recorded in `state`."""
    problems = {}
    for name in sorted(state.get("files", {}))[rank::world]:
        size, checksum = state["files"][name]
        file = path / name
        if not file.is_file():
            problems[name] = "missing"
        elif file.stat().st_size != size:
            problems[name] = f"truncated or resized: {file.stat().st_size} bytes, {size} written"
        elif file_digest(file) != checksum:
            problems[name] = "corrupt: its checksum differs from the one written"
    return problems


STEP_DIR = re.compile(r"step_(\d+)")


def agreed(value):
    """Rank 0's `value` on every rank (collective): decisions taken from a shared filesystem,
    whose views may briefly differ between hosts, must be one decision."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), max(keep, 1), is_main

    def latest(self) -> Path | None:
        """What the `latest` pointer names (unverified), or None (also for a pointer that names no
        step_N directory of this run dir)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return self.root / name if STEP_DIR.fullmatch(name) else None

    def complete(self) -> list[tuple[int, Path]]:
        """(recorded step, path) of every complete checkpoint up to `latest`'s step, newest first;
        later ones (not this run's: `latest` never named them) are left alone."""
        latest = self.latest()
        newest = int(STEP_DIR.fullmatch(latest.name)[1]) if latest is not None else None
        found = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if not (path.is_dir() and STEP_DIR.fullmatch(path.name) and (path / TRAIN_STATE).is_file()):
                continue
            try:
                step = int(read_train_state(path)["step"])
            except (CheckpointDamaged, KeyError, TypeError, ValueError):
                step = -1  # unreadable state: verification moves it aside
            if newest is None or step <= newest or path == latest:
                found.append((step, path))
        return sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True)

    def resumable(self) -> Path | None:
        """The checkpoint to resume from (collective): `latest`'s target if it verifies, else the
        newest intact one before it, with a warning; damaged ones are renamed `*.damaged`. None on
        a fresh run dir; CheckpointDamaged when checkpoints exist but none is intact."""
        latest = self.latest()
        candidates = [p for _, p in self.complete()]
        if latest is not None:
            candidates = [latest] + [p for p in candidates if p != latest]
        candidates = agreed(candidates if self.is_main else None)
        rank, world = dist.get_rank(), dist.get_world_size()
        rejected = []
        for path in candidates:
            try:
                problems = _gathered(damage(path, read_train_state(path), rank, world))
            except CheckpointDamaged as e:
                problems = {TRAIN_STATE: str(e)}
            if not problems:
                if rejected and self.is_main:
                    print(f"WARNING: resuming from {path} instead: {'; '.join(rejected)}", flush=True)
                return path
            file, what = sorted(problems.items())[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            rejected.append(f"{path} is damaged: {path / file}: {what}{more}")
            dist.barrier()  # every rank has finished reading it
            if self.is_main and path.is_dir():
                aside = path.with_name(path.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)  # an older damaged copy of the same step
                os.replace(path, aside)
        if rejected:
            raise CheckpointDamaged("no intact checkpoint to resume from: " + "; ".join(rejected) +
                                    ". Start afresh with --checkpoint.resume=false or in another checkpoint.dir.")
        return None

    def save(self, step: int, backend, train_state: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash mid-save
            tmp.mkdir(parents=True)
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / RNG_STATE)
        dist.barrier()
        backend.save(tmp)
        dist.barrier()  # every rank's shards are on disk
        files = file_table(tmp)
        if self.is_main:
            write_atomic(tmp / TRAIN_STATE, json.dumps({**train_state, "files": files}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name)
            self._prune()
        dist.barrier()
        return final

    def load(self, path: Path, backend) -> dict:
        backend.load(path)
        rng = torch.load(path / RNG_STATE, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return read_train_state(path)

    def _prune(self) -> None:
        """Keep the `keep` newest checkpoints by recorded step (up to latest's), and always
        `latest`'s target."""
        latest = self.latest()
        for _, old in self.complete()[self.keep:]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)

"""Atomic, verified, resumable checkpoints.

Layout under `checkpoint.dir` (a filesystem every rank sees):

    step_00000500/          a complete checkpoint: the backend's files (DCP or DeepSpeed) plus
        rng.pt              rank 0's RNG states
        train_state.json    step, consumed_samples, bad_steps, the world size, the last logged
                            metrics, the config it was written with, and the size and CRC-32 of
                            every other file in the directory; written last
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
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

TRAIN_STATE, RNG_STATE, LATEST = "train_state.json", "rng.pt", "latest"


class CheckpointDamaged(RuntimeError):
    pass


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            value = zlib.crc32(block, value)
    return value


def _gathered(items: dict) -> dict:
    """The union of every rank's dict (collective)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return {k: v for part in parts for k, v in part.items()}


def file_table(root: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under `root` (collective: each rank reads a
    share of the files)."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != TRAIN_STATE)
    rank, world = dist.get_rank(), dist.get_world_size()
    return _gathered({f: [(root / f).stat().st_size, crc32(root / f)] for f in files[rank::world]})


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
        elif crc32(file) != checksum:
            problems[name] = "corrupt: its CRC-32 differs from the one written"
    return problems


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), max(keep, 1), is_main

    def latest(self) -> Path | None:
        """What the `latest` pointer names (unverified), or None."""
        pointer = self.root / LATEST
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    def complete(self) -> list[tuple[int, Path]]:
        """(recorded step, path) of every complete checkpoint, newest first."""
        found = []
        for path in self.root.glob("step_*"):
            if path.is_dir() and path.suffix not in (".tmp", ".damaged") and (path / TRAIN_STATE).is_file():
                try:
                    found.append((int(read_train_state(path)["step"]), path))
                except (CheckpointDamaged, KeyError, ValueError):
                    found.append((-1, path))  # unreadable state: verification will move it aside
        return sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True)

    def resumable(self) -> Path | None:
        """The checkpoint to resume from (collective): `latest`'s target if it verifies, else the
        newest intact one, with a warning; damaged ones are renamed `*.damaged`. None on a fresh
        run dir; CheckpointDamaged when checkpoints exist but none is intact."""
        latest = self.latest()
        candidates = [p for _, p in self.complete()]
        if latest is not None:
            candidates = [latest] + [p for p in candidates if p != latest]
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
                os.replace(path, path.with_name(path.name + ".damaged"))
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
        """Keep the `keep` newest checkpoints by recorded step, and always `latest`'s target."""
        latest = self.latest()
        for _, old in self.complete()[self.keep:]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)

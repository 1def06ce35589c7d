"""Atomic, resumable checkpoints.

Layout under `checkpoint.dir` (a filesystem every rank sees):

    step_00000500/          a complete checkpoint: the backend's files (DCP or DeepSpeed) plus
        train_state.json    step, consumed_samples, bad_steps and the config it was written with
        rng.pt              rank 0's RNG states
    latest                  the name of the newest complete checkpoint

A checkpoint is written to `step_N.tmp/`, renamed to `step_N/` only when every rank has finished,
and only then does `latest` (itself replaced atomically) point at it. A crash at any moment leaves
`latest` naming a complete checkpoint. The teacher's weights are never saved.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

TRAIN_STATE, RNG_STATE, LATEST = "train_state.json", "rng.pt", "latest"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), max(keep, 1), is_main

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint; "
                                    f"point it at an existing step_* directory or delete it to start afresh.")
        return path

    def save(self, step: int, backend, train_state: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash mid-save
            tmp.mkdir(parents=True)
        dist.barrier()
        backend.save(tmp)
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / RNG_STATE)
            write_atomic(tmp / TRAIN_STATE, json.dumps(train_state, indent=2))
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
        return json.loads((path / TRAIN_STATE).read_text())

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

"""What a shared, preemptible cluster asks of a training run: stop on a signal with a checkpoint,
one job per run directory, no rank outliving its launcher, and exit codes a job script can act on.

Exit codes of `python -m lrc_dist.train` (each rank's; torchrun itself exits 1 when any rank
exits non-zero, so with LRC_EXIT_FILE set rank 0 also writes its code to that file):

    0   finished (or stopped at `stop_at`), checkpoint written
    1   an unexpected error (traceback)
    2   a bad configuration: every problem found, each naming its key, before anything loads
    65  diverged: `max_bad_steps` bad steps in a row; the message names the last good checkpoint
    69  the run directory is held by another live job (the message names it)
    75  preempted: stopped on SIGTERM/SIGUSR1/SIGINT at a step boundary, checkpoint written;
        run the same command again to resume

No checkpoint is written during a streak of bad steps, also not at the end or on a signal: the
last one before the streak stays `latest` (the message says so).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_CONFIG, EXIT_DIVERGED, EXIT_LOCKED, EXIT_PREEMPTED = 2, 65, 69, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """While active, SIGTERM, SIGUSR1 and SIGINT only raise a flag: the ranks agree on it at the
    next step boundary (`agree`), write a checkpoint and exit with EXIT_PREEMPTED. In a process
    of its own (no torchrun), a second Ctrl-C stops at once, without a checkpoint; torchrun turns
    every Ctrl-C into a SIGTERM to the ranks, and kills them after its --shutdown-timeout."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
        self.signum = self.signum or signum
        # os.write, not print: a handler may run while the main thread is inside print
        os.write(2, f"rank {os.environ.get('RANK', 0)}: {signal.Signals(signum).name}: stopping at the end of this "
                    f"step with a checkpoint (Ctrl-C again stops at once, without one)\n".encode())

    def agree(self, checkpoint_due: bool, device: torch.device) -> tuple[int, bool]:
        """Collective, at a step boundary: (a stop signal any rank received, or 0; whether any rank
        finds a checkpoint due). Every rank gets the same answer, so all stop or go on together."""
        flags = torch.tensor([self.signum, int(checkpoint_due)], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, due = flags.tolist()
        return signum, bool(due)


def die_with_launcher() -> None:
    """Under torchrun, have the kernel send this rank SIGTERM when its launcher dies (even by
    kill -9), so the rank stops at the next step boundary with a checkpoint instead of training
    on as an orphan."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher, PR_SET_PDEATHSIG = os.getppid(), 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != launcher:  # it died before prctl took effect: we were handed to a reaper
        os.kill(os.getpid(), signal.SIGTERM)


# ---- one job per run directory --------------------------------------------------------------------


class RunDirLocked(RuntimeError):
    pass


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (guards against a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(holder: dict) -> bool:
    """Whether the holder (on this host) still runs: its pid exists and started when it did."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


class RunLock:
    """`RUN_DIR/lock`, held by rank 0 of the one job training in RUN_DIR: a JSON record of host, pid
    and Slurm job id, its mtime refreshed every `stale_after / 10` seconds as a heartbeat.

    A lock is taken over when its holder is gone:
    - on the same host, when the pid no longer runs (or now belongs to a later process);
    - from another host, by a later run of the same Slurm job (same SLURM_JOB_ID, higher
      SLURM_RESTART_COUNT: Slurm requeued it), or when the heartbeat is older than `stale_after`
      seconds (the clocks of the hosts and the file server must agree to well within that).
    Anything else is a live holder, and acquiring fails at once with RunDirLocked naming it.
    """

    def __init__(self, run_dir: str | Path, stale_after: float = 600.0):
        self.path = Path(run_dir) / "lock"
        self.stale_after = stale_after
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                       "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._mine = f"{self.record['host']}.{os.getpid()}"  # names of this job's temporary files
        self._text = json.dumps(self.record)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race against another starting job goes round again
            if self._create():
                break
            text, holder = self._read()
            if holder is None:
                continue  # vanished meanwhile
            reason = self._stale(holder)
            if reason is None:
                raise RunDirLocked(
                    f"{self.path.parent} is in use by another job: {self._describe(holder)} (lock file {self.path}). "
                    f"Wait for it to end, stop it, or train in another checkpoint.dir. If you are sure that job is "
                    f"gone, delete {self.path}.")
            if self._take_over(text):
                print(f"taking over {self.path}: {reason}", flush=True)
                break
        else:
            raise RunDirLocked(f"could not take {self.path}: other jobs keep taking it; is more than one job starting on "
                               f"{self.path.parent}?")
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="lrc-run-lock")
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            if self._read()[0] == self._text:
                self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Create the lock, whole, unless it exists: link() of a written file is atomic and exclusive
        (also on NFS), so no other job ever reads a half-written lock."""
        tmp = self.path.with_name(f"lock.new.{self._mine}")
        tmp.write_text(self._text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _read(self) -> tuple[str | None, dict | None]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            return text, json.loads(text)
        except json.JSONDecodeError:  # torn by a crash mid-write: nobody holds it
            return text, {}

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is gone, or None if it may be alive."""
        if not holder:
            return "the lock file is unreadable"
        if holder.get("host") == self.record["host"]:
            return None if _alive(holder) else f"its holder, pid {holder.get('pid')} on this host, is gone"
        job = self.record["slurm_job_id"]
        if job is not None and holder.get("slurm_job_id") == job and \
                holder.get("slurm_restart", 0) < self.record["slurm_restart"]:
            return f"it was held by an earlier run of this Slurm job {job}, since requeued"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it vanished"
        if age > self.stale_after:
            return f"its holder on {holder.get('host')} has not refreshed it for {age / 60:.0f} min"
        return None

    def _take_over(self, seen: str) -> bool:
        """Replace the stale lock whose text is `seen`; False if another job got there first.

        Only the job holding `lock.breaking` (created exclusively, as the lock is) may delete the
        lock, and only while its text is still `seen`: no job ever moves or deletes a lock another
        job has just taken. (Renaming the stale lock aside and putting back a fresh one moved by
        mistake let two of four jobs starting together both hold it.)"""
        token, mine = self.path.with_name("lock.breaking"), self.path.with_name(f"lock.breaking.{self._mine}")
        mine.write_text(self._text)
        try:
            os.link(mine, token)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - token.stat().st_mtime > 60:  # left by a job that died breaking the lock
                    token.unlink()
            return False
        finally:
            mine.unlink()
        try:
            if self._read()[0] != seen:
                return False  # another job took it meanwhile
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            token.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / 10):
            if self._read()[0] != self._text:  # deleted by hand, or taken over as stale
                print(f"WARNING: {self.path} is no longer this job's; another job may now train in "
                      f"{self.path.parent}", file=sys.stderr, flush=True)
                return
            os.utime(self.path)

    @staticmethod
    def _describe(holder: dict) -> str:
        job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, info, stale_after: float):
    """Rank 0 holds the RunLock of `run_dir` while the block runs; every rank fails alike when it
    cannot (collective, `info` a parallel.DistInfo)."""
    lock, error = RunLock(run_dir, stale_after), None
    if info.is_main:
        try:
            lock.acquire()
        except Exception as e:  # whatever it is, the other ranks must hear of it, not wait forever
            error = e
    held = torch.tensor([error is None], dtype=torch.int64, device=info.device)
    dist.broadcast(held, 0)
    if not held.item():
        raise error or RunDirLocked(f"rank 0 could not lock {run_dir}")
    try:
        yield lock
    finally:
        if info.is_main:
            lock.release()

"""Files lrc_dist ships (recipes, DeepSpeed configs, tokenizers, tasks), found wherever it runs.

`shipped("ds_configs/zero3.json")` is that path as given when it exists (relative to the working
directory, or absolute), else the copy that comes with the package, so a documented default such
as `parallel.deepspeed_config=ds_configs/zero3.json` works from any directory and from an installed
wheel alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(path: str | Path) -> Path:
    given = Path(path)
    if given.exists() or given.is_absolute() or not (PACKAGE / given).exists():
        return given
    return PACKAGE / given


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
CPU_MEMORY_KEPT = False  # keep_freed_cpu_memory has applied its settings in this process


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory in the process, as the CUDA caching allocator does: every block
    from the heap (no mmap), the heap never trimmed, grown 256 MiB at a time. Without this, a
    training step on the CPU maps, page-faults in zero-filled, and unmaps many of its large
    temporaries (the head loss's logit chunks): 654k page faults per step measured at the bench's
    shape (bench/RESULTS.md). The process's memory then stays at its peak, as it does on a GPU.
    Called by the trainer and the evaluation on a CPU. A no-op returning False where the C library
    is not glibc."""
    global CPU_MEMORY_KEPT
    if CPU_MEMORY_KEPT:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt takes other parameters)
    except (OSError, AttributeError):
        return False
    # mallopt(M_TRIM_THRESHOLD) also freezes the mmap threshold: mmap goes off first
    CPU_MEMORY_KEPT = bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
                           and libc.mallopt(M_TOP_PAD, 1 << 28))
    return CPU_MEMORY_KEPT

"""Files lrc_dist ships (recipes, DeepSpeed configs, tokenizers, tasks), found wherever it runs.

`shipped("ds_configs/zero3.json")` is that path as given when it exists (relative to the working
directory, or absolute), else the copy that comes with the package, so a documented default such
as `parallel.deepspeed_config=ds_configs/zero3.json` works from any directory and from an installed
wheel alike.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(path: str | Path) -> Path:
    given = Path(path)
    if given.exists() or given.is_absolute() or not (PACKAGE / given).exists():
        return given
    return PACKAGE / given

"""Rebuilds the multiple-choice task shipped in assets/tasks/ (pydoc_cloze.jsonl).

Items are sentences of the demo's held-out documents (Python documentation and docstrings): the first half of a
sentence is the query; its true second half is hidden among the second halves of three others.

    .venv/bin/python data_prep/build_tasks.py [--items 120] [--seed 0]
"""

import os
import sys

# data_prep/tokenize.py shadows the standard library's `tokenize`: keep this directory off the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import fire  # noqa: E402

from lrc_dist.demo import TASK, build_task  # noqa: E402


def main(items: int = 120, seed: int = 0) -> None:
    build_task(TASK, items, seed)
    print(f"wrote {TASK}")


if __name__ == "__main__":
    fire.Fire(main)

"""`python data_prep/tokenize.py ...`: the same command as `lrc-tokenize ...` and
`python -m lrc_dist.prep ...`, which holds it (examples and options: lrc_dist/prep.py)."""

import os
import sys

# Run as a script, this file's directory comes first on sys.path, and the file would stand in for
# the standard library's `tokenize` (which linecache and inspect import): take it off first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from lrc_dist.prep import main  # noqa: E402

if __name__ == "__main__":
    main("tokenize.py")

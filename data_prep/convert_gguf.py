"""`python data_prep/convert_gguf.py GGUF_FILE OUT_DIR ...`: the same command as `lrc-convert ...`
and `python -m lrc_dist.convert ...`, which holds it (options: lrc_dist/convert.py)."""

import os
import sys

# Run as a script, this file's directory comes first on sys.path, where data_prep/tokenize.py
# would stand in for the standard library's `tokenize`: take it off first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from lrc_dist.convert import main  # noqa: E402

if __name__ == "__main__":
    main()

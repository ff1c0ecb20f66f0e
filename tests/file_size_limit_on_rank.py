"""Run a training script with a file-size limit on one process of a launch (tests only).

Usage:
    accelerate launch ... tests/file_size_limit_on_rank.py RANK BYTES scripts/finetune.py RECIPE.yaml [...]

The process whose RANK matches gets RLIMIT_FSIZE = BYTES: a write past it fails with EFBIG (Python ignores
SIGXFSZ), as a full disk would fail that one process's save. The others run unlimited.
"""

import os
import resource
import runpy
import sys

if __name__ == "__main__":
    rank, limit, script, *args = sys.argv[1:]
    if os.environ.get("RANK") == rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")

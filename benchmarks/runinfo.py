"""Where a benchmark run came from: the commit of the code it measured, kept in the run's JSON
so that ``report.py`` prints it with the run's table; and the allocator setting a run can ask
for (``keep_freed_memory_mapped``)."""

import os
import subprocess
from pathlib import Path


def keep_freed_memory_mapped() -> None:
    """``--retain-memory``: processes started after this call (the benchmarks spawn one per
    measured system or model) run with glibc keeping freed memory mapped, as a server with a
    caching allocator does. With glibc's defaults every large temporary is a fresh mapping whose
    pages fault in on first touch (about 1.7 µs per 4 KiB page on this VM), which costs code with
    100+ MB of temporaries per call (a padded batch, a batch of history copies) a large share of
    its time."""
    os.environ.update(MALLOC_MMAP_THRESHOLD_=str(2**30), MALLOC_TRIM_THRESHOLD_=str(2**32),
                      MALLOC_TOP_PAD_=str(2**28))


def source_commit() -> str:
    """The short commit of this checkout, with ``+changes`` if tracked files differ from it, or
    ``"unknown"`` outside a git checkout."""
    root = str(Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                  "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changes else "")

"""Where a benchmark run came from: the commit of the code it measured, kept in the run's JSON
so that ``report.py`` prints it with the run's table."""

import subprocess
from pathlib import Path


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

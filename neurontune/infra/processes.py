"""Is a process alive: the one pid check of the project (job status files, temp files of dead writers)."""
from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """The start time of a process (Linux /proc), so a reused pid is not mistaken for the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """True while process `pid` runs and, given its `started` time, is still that process (not a reused pid).
    A process we may not signal (another user's) exists; any other failure means there is no such process."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass
    except (OSError, OverflowError, ValueError):
        return False
    return started is None or process_start(pid) in (None, started)

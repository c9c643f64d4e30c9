"""Whether another open file holds a lock on a file (POSIX flock): how llamabox tells a file or folder still in
use by a running process from one left behind, without a lock server or PID files (which a reused PID fools)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def locked_by_another(path: Path) -> bool | None:
    """True if an open file (of any process, this one included) holds a flock on `path`, False if none does,
    None if `path` cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)

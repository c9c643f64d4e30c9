"""A new file beside another, to write in full and then rename over it.

tempfile.mkstemp does this job, except on Windows where a folder may not be written: os.access ignores
permissions there, so mkstemp takes the refusal for a name already taken and tries the next name, some two
billion times (a start that hangs on a read-only share). One random name, one try.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_beside(path: Path) -> tuple[int, Path]:
    """An open descriptor for writing, and the path, of a new file in `path`'s folder; OSError where it cannot be made."""
    partial = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    return fd, partial

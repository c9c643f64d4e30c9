"""Writing an output file so that it either appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from runtime.errors import LlamaboxError


@contextlib.contextmanager
def atomic_write(path: Path, force: bool = False, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a temporary file beside `path`; on success it is renamed over `path`, else deleted."""
    directory = path.parent
    if path.is_dir():
        raise LlamaboxError(f"{path} is a directory; give a file name for the output")
    if path.exists() and not force:
        raise LlamaboxError(f"{path} already exists; use --force to overwrite it")
    if not directory.is_dir():
        raise LlamaboxError(f"output directory {directory} does not exist; create it first")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".partial")
    except OSError as exc:
        raise LlamaboxError(f"cannot write to {directory}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LlamaboxError(f"writing {path} failed: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Writing an output file so that it appears complete or not at all, and nothing is left when a build stops.

On Linux the file is written unnamed (O_TMPFILE) in the output's directory and gets its name only
once it is complete (linkat through /proc/self/fd): if the process dies, even of SIGKILL, the kernel
frees the blocks and nothing remains. Where that is not possible (another OS, a file system without
O_TMPFILE, no /proc) it is a hidden `.NAME.XXXX.partial` beside the output, locked while it is being
written: SIGINT and SIGTERM unwind through `interruptible()` and delete it, and after a SIGKILL the
next build into that directory deletes it (its lock is free once its writer is gone). A full disk is
one more way for a write to fail: the error says so, how much room there is, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from runtime.errors import LlamaboxError

_PROC_FD = Path("/proc/self/fd")
# O_TMPFILE is refused with one of these where the file system or kernel lacks it.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}
# A full disk, or a user's quota used up.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived during a build (a BaseException, like KeyboardInterrupt, so no `except Exception` stops it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise Interrupted, so that every `finally` and cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def check_output(path: Path, force: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if path.is_dir():
        raise LlamaboxError(f"{path} is a directory; give a file name for the output")
    if path.exists() and not force:
        raise LlamaboxError(f"{path} already exists; use --force to overwrite it")
    if not path.parent.is_dir():
        raise LlamaboxError(f"output directory {path.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_write(path: Path, force: bool = False, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a file that becomes `path` (mode `mode`) only when the block completes; otherwise nothing remains."""
    check_output(path, force)
    remove_stale_partials(path)
    fd = _unnamed_file(path.parent)
    if fd is not None:
        with _unnamed(fd, path, force, mode) as f:
            yield f
    else:
        with _named(path, mode) as f:
            yield f


def _unnamed_file(directory: Path) -> int | None:
    """An unnamed file in `directory` (Linux O_TMPFILE), or None where that is not available."""
    if not hasattr(os, "O_TMPFILE") or not _PROC_FD.is_dir():
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise _write_error(directory, exc, f"cannot write to {directory}") from None


@contextlib.contextmanager
def _unnamed(fd: int, path: Path, force: bool, mode: int) -> Iterator[BinaryIO]:
    f = os.fdopen(fd, "wb")
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
            _link(f.fileno(), path, force)
        finally:
            _close(f)  # closing the unnamed file frees its blocks, whatever happened
    except OSError as exc:
        raise _write_error(path.parent, exc, f"writing {path} failed") from None


def _close(f: BinaryIO) -> None:
    """Close `f`. Closing flushes what is still buffered; if that fails, the file is incomplete, an error is on its
    way already, and an OSError from here would only replace it (a full disk fails every flush, not just the first)."""
    with contextlib.suppress(OSError):
        f.close()


def _write_error(directory: Path, exc: OSError, what: str) -> LlamaboxError:
    """The one-line error for `exc`, raised while writing into `directory`: for a full disk, say so and what to do."""
    if exc.errno in _DISK_FULL:
        problem = "the disk is full" if exc.errno == errno.ENOSPC else "your disk quota is used up"
        return LlamaboxError(
            f"{what}: {problem} ({_free(directory)} free in {directory}); nothing was written: free some space there, "
            "or write the output to another disk with -o"
        )
    return LlamaboxError(f"{what}: {exc.strerror or exc}")


def _free(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:,.1f} MB"
    except OSError:
        return "no space"


def _link(fd: int, path: Path, force: bool) -> None:
    """Give the unnamed file `fd` the name `path`, replacing what is there only with `force`."""
    if not force:
        try:
            _linkat(fd, path)
        except FileExistsError:
            raise LlamaboxError(f"{path} appeared while it was being built; use --force to overwrite it") from None
        return
    # link() never replaces a file: name it beside the output, then rename over the output.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    _linkat(fd, temporary)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _linkat(fd: int, path: Path) -> None:
    """linkat(AT_FDCWD, "/proc/self/fd/FD", AT_FDCWD, path, AT_SYMLINK_FOLLOW), as open(2) describes for O_TMPFILE.

    A plain os.link() calls link(), which does not follow /proc's link and fails with EXDEV; giving a
    directory descriptor makes Python call linkat() with AT_SYMLINK_FOLLOW (the absolute source path
    ignores the descriptor).
    """
    root = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.link(f"{_PROC_FD}/{fd}", path, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


@contextlib.contextmanager
def _named(path: Path, mode: int) -> Iterator[BinaryIO]:
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".partial")
    except OSError as exc:
        raise _write_error(directory, exc, f"cannot write to {directory}") from None
    tmp = Path(tmp_name)
    f = os.fdopen(fd, "wb")
    try:
        try:
            _lock(f.fileno())
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            _close(f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(directory, exc, f"writing {path} failed") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the `.NAME.*.partial` files that builds of `path` killed before they could clean up; returns them.

    A partial file still being written by a running build is locked, and kept.
    """
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*.partial"):
        if _abandoned(candidate):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


if sys.platform == "win32":  # an open file cannot be deleted there: a failed unlink means it is in use

    def _lock(fd: int) -> None:
        pass

    def _abandoned(path: Path) -> bool:
        return True

else:
    import fcntl

    from runtime.file_lock import locked_by_another

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _abandoned(path: Path) -> bool:
        return locked_by_another(path) is False

"""The runtime's unpacked files: checked before use, unpacked again when damaged, a temporary copy removed.

The launcher (runtime/launcher.sh) unpacks the runtime once per build into <cache>/runtime/<id>.XXXXXX and
publishes it with the link <cache>/runtime/<id>, made last, so a half-unpacked folder is never used; it checks
that the files Python needs are whole. This module, run first by the runtime, checks every other file's size
against the list build.py packed with it (a few hundred stat calls, about a millisecond). Sizes, not hashes:
hashing 100 MB would cost most of what the cache saves, and what goes wrong in a cache folder in practice is
files deleted or cut short, not flipped bits.

A running runtime holds a shared lock on its folder's file list, so that no other start removes the folder
under it (a copy whose link another start replaced, say); leftovers are removed only when nobody holds it.

On Windows the launcher (runtime/windows_launcher.c) publishes the folder by renaming it to <id>, and Windows
itself keeps a running program's files from being removed. A damaged copy cannot be removed from inside it, so
the runtime exits with RETRY_EXIT_CODE and the launcher sets the folder aside and unpacks again; it also removes
a temporary copy once the runtime has exited.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from runtime.packaged import COMPLETE_MARKER, FILE_LIST_NAME, Launch

RETRY_ENV = "LLAMABOX_RUNTIME_RETRY"
RETRY_EXIT_CODE = 75  # Windows: "my files are damaged", to the launcher (runtime/windows_launcher.c knows it too)
# Folders no link names: a whole copy whose link the launcher replaced once it is older than a start takes to
# link it; anything else (an unpacking killed half-way) once surely abandoned. Only names the launcher makes.
_REPLACED_SECONDS = 60
_ABANDONED_SECONDS = 3600
# Another runtime build (an older llamabox's) not started for this long is removed, link and folder.
_UNUSED_SECONDS = 30 * 24 * 3600
_OURS = re.compile(r"^[0-9a-f]{16}\.[A-Za-z0-9]{6}$|^\.trash-[0-9a-f]{16}\.[A-Za-z0-9]{6}-\d+$")
_LINK = re.compile(r"^[0-9a-f]{16}$")
_temporary: Path | None = None  # the runtime unpacked for this run only
_in_use: int | None = None  # the descriptor holding this runtime's shared lock


def prepare(started: Launch | None) -> None:
    """Check the unpacked runtime; when damaged, remove it and start the bundle again (the launcher unpacks it anew)."""
    if started is None:
        return
    folder = _running_from(started)
    if started.temporary and sys.platform != "win32":
        global _temporary
        _temporary = folder
        atexit.register(remove_temporary)
    problem = damage(folder)
    if problem is None:
        os.environ.pop(RETRY_ENV, None)
        if not started.temporary:
            _hold(folder)
            if sys.platform != "win32":  # the link's time says when this runtime build last started
                with contextlib.suppress(OSError):
                    os.utime(started.runtime_dir, follow_symlinks=False)
            sweep(folder.parent)
        return
    if os.environ.get(RETRY_ENV) or started.temporary:
        where = "start again" if started.temporary else f"remove {folder.parent} and start again"
        sys.exit(f"llamabox: the runtime unpacked in {folder} is damaged ({problem}) right after unpacking; {where}, "
                 "or set LLAMABOX_CACHE to a folder on another disk")
    print(f"llamabox: the runtime unpacked in {folder} is damaged ({problem}); unpacking it again", file=sys.stderr)
    if sys.platform == "win32":
        sys.exit(RETRY_EXIT_CODE)
    discard(started.runtime_dir, folder)
    os.environ[RETRY_ENV] = "1"
    # Through sh, as the launcher is a shell script: also when the bundle is not executable (`sh model.run`).
    os.execv("/bin/sh", ["/bin/sh", str(started.bundle), *sys.argv[1:]])


def _running_from(started: Launch) -> Path:
    """The folder this process really runs from (PyInstaller's one-folder build keeps its files in _internal/), not
    the link the launcher went through, which another start may have pointed elsewhere since."""
    unpacked = getattr(sys, "_MEIPASS", None)
    return Path(unpacked).resolve().parent if unpacked else started.runtime_dir.resolve()


def remove_temporary() -> None:
    """Remove the runtime unpacked for this run only, if it was. At exit; the supervisor, which leaves with os._exit,
    calls it itself, as the last process of the run."""
    global _temporary
    if _temporary is not None:
        shutil.rmtree(_temporary, ignore_errors=True)
        _temporary = None


def damage(folder: Path) -> str | None:
    """What is wrong with the unpacked runtime in `folder` (a missing file, a wrong size), or None."""
    try:
        sizes = json.loads((folder / FILE_LIST_NAME).read_text())
    except (OSError, ValueError):
        return f"{FILE_LIST_NAME} is missing or unreadable"
    for name, size in sizes.items():
        try:
            actual = os.stat(folder / name).st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual:,} bytes instead of {size:,}"
    return None


def discard(link: Path, folder: Path) -> None:
    """Take the damaged runtime in `folder` out of use: its link first (only if it still names this folder), so that
    no start picks it up, then the folder itself."""
    try:
        if link.is_symlink() and os.readlink(link) == folder.name:
            link.unlink()
    except OSError:
        pass
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    try:
        folder.rename(trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def sweep(runtimes: Path) -> None:
    """Remove from `runtimes` what no start will use: runtime builds not started for 30 days, and what replaced,
    discarded and killed unpackings left (folders no link names). Only the launcher's names, never a folder that a
    running runtime holds."""
    now = time.time()
    try:
        links = [e for e in os.scandir(runtimes) if _LINK.match(e.name) and e.is_symlink()]
        for link in links:
            target = Path(runtimes, os.readlink(link.path))
            if now - link.stat(follow_symlinks=False).st_mtime > _UNUSED_SECONDS and not _held(target):
                os.unlink(link.path)  # the folder goes below, as one no link names
        entries = [e for e in os.scandir(runtimes) if _OURS.match(e.name) or e.is_symlink()]
    except OSError:
        return
    linked = {os.readlink(e.path) for e in entries if e.is_symlink()}
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False) or entry.name in linked:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        whole = os.path.exists(os.path.join(entry.path, COMPLETE_MARKER))
        stale = entry.name.startswith(".trash-") or age > _ABANDONED_SECONDS or (whole and age > _REPLACED_SECONDS)
        if stale and not _held(Path(entry.path)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _hold(folder: Path) -> None:
    """Hold a shared lock on `folder`'s file list while this process (and its forks) runs from it."""
    global _in_use
    if sys.platform == "win32":
        return
    import fcntl

    try:
        _in_use = os.open(folder / FILE_LIST_NAME, os.O_RDONLY)
        fcntl.flock(_in_use, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pass


def _held(folder: Path) -> bool:
    """Whether a running runtime holds `folder` (its file list's lock cannot be taken)."""
    if sys.platform == "win32":
        return False
    from runtime.file_lock import locked_by_another

    return locked_by_another(folder / FILE_LIST_NAME) is True

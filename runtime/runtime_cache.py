"""The runtime's unpacked files: checked before use, unpacked again when damaged, a temporary copy removed.

The launcher (runtime/launcher.sh) unpacks the runtime once per build into <cache>/runtime/<id> (a link to
the folder it unpacked into, made last so that a half-unpacked folder is never used) and starts it from
there at every later start. It checks only what Python needs to start; this module, run first by the
runtime, checks every file's size against the list build.py packed with it (a few hundred stat calls,
about a millisecond). Sizes, not hashes: hashing 130 MB would cost most of what the cache saves, and
what goes wrong in a cache folder in practice is files deleted or cut short, not flipped bits.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time
from pathlib import Path

from runtime.packaged import COMPLETE_MARKER, FILE_LIST_NAME, Launch

RETRY_ENV = "LLAMABOX_RUNTIME_RETRY"
# Folders no link names: a whole copy whose link the launcher replaced (it found the copy damaged) once it is
# older than a start takes to link it; anything else (an unpacking killed half-way) once surely abandoned.
_REPLACED_SECONDS = 60
_ABANDONED_SECONDS = 3600
_temporary: Path | None = None  # the runtime unpacked for this run only


def prepare(started: Launch | None) -> None:
    """Check the unpacked runtime; when damaged, remove it and start the bundle again (the launcher unpacks it anew)."""
    if started is None:
        return
    if started.temporary:
        global _temporary
        _temporary = started.runtime_dir
        atexit.register(remove_temporary)
    problem = damage(started.runtime_dir)
    if problem is None:
        os.environ.pop(RETRY_ENV, None)
        if not started.temporary:
            sweep(started.runtime_dir.parent)
        return
    if os.environ.get(RETRY_ENV):
        sys.exit(
            f"llamabox: the runtime unpacked in {started.runtime_dir} is damaged ({problem}) even after unpacking "
            f"it again; remove {started.runtime_dir.parent} and start again, or set LLAMABOX_CACHE to another folder"
        )
    print(f"llamabox: the runtime unpacked in {started.runtime_dir} is damaged ({problem}); unpacking it again", file=sys.stderr)
    discard(started.runtime_dir)
    os.environ[RETRY_ENV] = "1"
    # Through sh, as the launcher is a shell script: also when the bundle is not executable (`sh model.run`).
    os.execv("/bin/sh", ["/bin/sh", str(started.bundle), *sys.argv[1:]])


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


def discard(folder: Path) -> None:
    """Take a damaged runtime out of use (its link first, so no start picks it up), then remove it."""
    real = folder.resolve()
    if folder.is_symlink():
        folder.unlink(missing_ok=True)
    trash = real.with_name(f".trash-{real.name}-{os.getpid()}")
    try:
        real.rename(trash)
    except OSError:
        trash = real
    shutil.rmtree(trash, ignore_errors=True)


def sweep(runtimes: Path) -> None:
    """Remove what replaced, discarded and killed unpackings left in `runtimes`: folders no link names."""
    try:
        entries = list(os.scandir(runtimes))
    except OSError:
        return
    linked = {os.readlink(e.path) for e in entries if e.is_symlink()}
    now = time.time()
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False) or entry.name in linked:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        whole = os.path.exists(os.path.join(entry.path, COMPLETE_MARKER))
        if entry.name.startswith(".trash-") or age > _ABANDONED_SECONDS or (whole and age > _REPLACED_SECONDS):
            shutil.rmtree(entry.path, ignore_errors=True)

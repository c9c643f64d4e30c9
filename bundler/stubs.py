"""Finding and checking runtime stubs (the model-independent executables build.py makes).

On Linux x86-64 the default stub is the portable one where scripts/build_portable.sh made it: build.py
writes it to the same place as a stub built for this machine only (`build.py --host`), and its
description records the newest glibc it needs (`min_glibc`), which `llamabox build` and `inspect` show.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PyInstaller.archive.readers import ArchiveReadError, CArchiveReader

from bundler import glibc
from runtime import bundle_format
from runtime.errors import StubError
from runtime.platform_tag import STUB_INFO_NAME, current_platform, stub_file_name

REPO_ROOT = Path(__file__).resolve().parent.parent
STUB_DIR = REPO_ROOT / "dist" / "stubs"


@dataclass(frozen=True)
class StubInfo:
    path: Path
    platform: str
    runtime_version: str
    llama_cpp_python: str
    min_glibc: str | None  # None: not Linux, or built before build.py recorded it


def default_stub_path() -> Path:
    """$LLAMABOX_STUB, else the stub `python build.py` made for this platform."""
    return Path(os.environ.get("LLAMABOX_STUB") or STUB_DIR / stub_file_name(current_platform()))


def read_stub(path: Path) -> StubInfo:
    """The stub's own description; StubError if `path` is not a llamabox runtime stub."""
    if not path.is_file():
        hint = "build one with `python build.py`" if path == default_stub_path() else "check the path"
        raise StubError(f"runtime stub not found: {path} ({hint}, or pass --stub PATH)")
    with open(path, "rb") as f:
        if bundle_format.read_trailer(f) is not None:
            raise StubError(f"{path.name} is already a llamabox bundle, not a runtime stub")
    info = description(path)
    if info is None:
        raise StubError(f"{path.name} is not a llamabox runtime stub (build one with `python build.py`)")
    return StubInfo(
        path=path,
        platform=info["platform"],
        runtime_version=info["runtime_version"],
        llama_cpp_python=info["llama_cpp_python"],
        min_glibc=info.get(glibc.MIN_GLIBC_KEY),
    )


def description(path: Path) -> dict[str, object] | None:
    """The description build.py wrote into a stub, also of the stub a bundle carries: in the launcher's last
    line (launcher layout), else in the PyInstaller archive (for a bundle, the archive's copy at its end);
    None if there is none."""
    try:
        with open(path, "rb") as f:
            header = bundle_format.read_stub_header(f)
        if header is not None:
            return header.description
        return json.loads(CArchiveReader(str(path)).extract(STUB_INFO_NAME))
    except (ArchiveReadError, KeyError, ValueError, TypeError, OSError):
        return None


def glibc_note(min_glibc: str | None) -> str:
    """What a recorded min_glibc means for users, e.g. '2.31 or newer: Debian 11, Ubuntu 20.04 ... and newer'."""
    if not min_glibc:
        return "not recorded (a stub built before llamabox measured it)"
    try:
        version = glibc.parse_version(min_glibc)
    except ValueError:
        return min_glibc
    return f"{min_glibc} or newer: {glibc.runs_on(version)}"


def is_portable(info: StubInfo) -> bool:
    """Whether a Linux stub needs no newer glibc than the portable build's target."""
    try:
        return info.min_glibc is not None and glibc.parse_version(info.min_glibc) <= glibc.TARGET
    except ValueError:
        return False

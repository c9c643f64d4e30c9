"""Finding and checking runtime stubs (the model-independent executables build.py makes)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PyInstaller.archive.readers import ArchiveReadError, CArchiveReader

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
    try:
        archive = CArchiveReader(str(path))
        info = json.loads(archive.extract(STUB_INFO_NAME))
    except (ArchiveReadError, KeyError, ValueError, OSError):
        raise StubError(f"{path.name} is not a llamabox runtime stub (build one with `python build.py`)") from None
    return StubInfo(
        path=path,
        platform=info["platform"],
        runtime_version=info["runtime_version"],
        llama_cpp_python=info["llama_cpp_python"],
    )

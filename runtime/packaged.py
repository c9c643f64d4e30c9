"""What the packaged runtime is: frozen by PyInstaller or run from a checkout, and where its files are.

A stub built by build.py has its files in one directory (PyInstaller's `sys._MEIPASS`): the backend
libraries in ggml-backends/, the chat page in templates/, the kernel self-test's model and the stub's
description file. That directory is in the runtime folder the launcher unpacked once (runtime/launcher.sh,
or runtime/windows_launcher.c on Windows), which tells the runtime through the environment which file the
user ran; an older onefile stub (Windows) unpacks into a new directory at every start and is itself the
file the user ran.
From a checkout, the same things come from the source tree, pip's install of llama-cpp-python and the
user's cache. Every other module asks here.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.platform_tag import STUB_INFO_NAME

# Files build.py puts at the top of the stub's unpacked directory.
BACKENDS_DIR_NAME = "ggml-backends"
TEMPLATES_DIR_NAME = "templates"
PROOF_MODEL_NAME = "kernel-proof.gguf"
# Files at the top of the launcher stub's runtime folder (build.py packs the first two).
FILE_LIST_NAME = ".llamabox-files"  # each file's size, checked at start (runtime.runtime_cache)
PROBE_NAME = ".llamabox-probe"  # run by the launcher: fails where the folder may not run programs
COMPLETE_MARKER = ".llamabox-complete"  # written by the launcher once an unpacking came out whole
# What the launcher tells the runtime it starts.
BUNDLE_ENV = "LLAMABOX_BUNDLE"
RUNTIME_DIR_ENV = "LLAMABOX_RUNTIME_DIR"
TEMPORARY_ENV = "LLAMABOX_RUNTIME_TEMPORARY"

_CHECKOUT = Path(__file__).resolve().parent.parent


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


@dataclass(frozen=True)
class Launch:
    """How the launcher started this runtime."""

    bundle: Path  # the file the user ran
    runtime_dir: Path  # where the runtime was unpacked
    temporary: bool  # unpacked for this run only (the cache could not be used): removed at exit


@functools.cache
def launch() -> Launch | None:
    """What the launcher said (read once, then taken out of the environment); None without a launcher."""
    bundle, folder = os.environ.pop(BUNDLE_ENV, None), os.environ.pop(RUNTIME_DIR_ENV, None)
    temporary = os.environ.pop(TEMPORARY_ENV, "0") == "1"
    if not is_frozen() or not bundle or not folder:
        return None
    # The real file, not a link to it: a sidecar is looked for beside the real file.
    return Launch(Path(os.path.realpath(bundle)), Path(folder), temporary)


def own_file() -> Path | None:
    """The file the user ran (a bundle or a stub); None from a checkout."""
    if not is_frozen():
        return None
    started = launch()
    return started.bundle if started is not None else Path(sys.executable)


def unpacked_dir() -> Path:
    """Where the frozen runtime's files are (PyInstaller's _MEIPASS)."""
    return Path(sys._MEIPASS)  # type: ignore[attr-defined]


def backend_dir() -> Path:
    """Where the backend libraries are: unpacked beside the stub's files, or pip's <site-packages>/bin."""
    if is_frozen():
        return unpacked_dir() / BACKENDS_DIR_NAME
    import llama_cpp  # not at the top: `--help` and the bundler's argument check must not load llama.cpp

    return Path(llama_cpp.__file__).parent.parent / "bin"


def ui_dir() -> Path:
    """The chat page's files."""
    return (unpacked_dir() if is_frozen() else _CHECKOUT) / TEMPLATES_DIR_NAME


def stub_info() -> dict[str, object] | None:
    """The description build.py wrote into this stub; None when running from a checkout."""
    if not is_frozen():
        return None
    return json.loads((unpacked_dir() / STUB_INFO_NAME).read_text())


def proof_model(fallback: Path) -> Path:
    """The kernel self-test's model: built into the stub, or written into the cache from a checkout
    (into `fallback` where the cache cannot be written)."""
    if is_frozen():
        return unpacked_dir() / PROOF_MODEL_NAME
    from runtime.devices.proof import model

    try:
        return model.ensure(cache_dir() / PROOF_MODEL_NAME)
    except OSError:
        return model.ensure(fallback / PROOF_MODEL_NAME)


def cache_dir() -> Path:
    """This user's cache directory for llamabox: $LLAMABOX_CACHE, else the platform's user cache.

    The bundler keeps the default model there; the runtime keeps only small things (the kernel
    self-test's verdicts), never weights: those stay mapped from the bundle.
    """
    if os.environ.get("LLAMABOX_CACHE"):
        return Path(os.environ["LLAMABOX_CACHE"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamabox"

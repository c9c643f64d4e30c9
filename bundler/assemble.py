"""Assembling a bundle: check the inputs, fetch the model, then write stub + model + manifest atomically."""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from bundler.atomic import atomic_write, check_output
from bundler.gguf_info import GGUFInfo, read_gguf_info
from bundler.sources import Fetched, fetch
from bundler.splits import MergedGGUF, split_name
from bundler.stubs import read_stub
from runtime import __version__, bundle_format
from runtime.bundle_format import Manifest, ModelEntry
from runtime.errors import LlamaboxError, ModelFileError

# Given the total byte count, returns a context manager yielding a callback for bytes done.
ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None]]]


def build_bundle(
    source: str | None,
    output: Path,
    stub: Path,
    *,
    revision: str | None = None,
    name: str | None = None,
    args: str = "",
    force: bool = False,
    progress: ProgressFactory,
) -> Manifest:
    """Write a bundle of the model `source` names (see bundler.sources) on `stub` to `output`.

    The stub, the arguments and the output path are checked before anything is downloaded, and the
    model before anything is written.
    """
    stub_info = read_stub(stub)
    default_args = _split_args(args)
    check_output(output, force)
    fetched = fetch(source, revision)
    with ExitStack() as stack:
        model, info, file_name, size, part_hashes = _open_model(fetched, stack)
        manifest = Manifest(
            name=name or Path(file_name).stem,
            model=ModelEntry(file_name=file_name, size=size, sha256=""),
            metadata=info.as_metadata(),
            default_args=default_args,
            platform=stub_info.platform,
            runtime_version=stub_info.runtime_version,
            llamabox_version=__version__,
            built_at=_build_time(),
            source=fetched.source,
        )

        def complete(written: Manifest) -> Manifest:
            """Each source file's SHA-256: the model's own for a single file, the parts' for a merged split."""
            hashes = part_hashes() or [written.model.sha256]
            files = [dataclasses.replace(f, sha256=h) for f, h in zip(fetched.source.files, hashes)]
            return dataclasses.replace(written, source=dataclasses.replace(fetched.source, files=files))

        stub_file = stack.enter_context(open(stub, "rb"))
        advance = stack.enter_context(progress(size))
        out = stack.enter_context(atomic_write(output, force=force, mode=0o755))
        return bundle_format.write_bundle(out, stub_file, model, manifest, advance, complete)


def _open_model(
    fetched: Fetched, stack: ExitStack
) -> tuple[BinaryIO | MergedGGUF, GGUFInfo, str, int, Callable[[], list[str]]]:
    """(reader, summary, file name, size, the parts' hashes once read) of the model, checked whole."""
    parts = fetched.parts
    if len(parts) > 1:
        merged = MergedGGUF(parts)
        name = split_name(parts[0].name)
        assert name is not None
        return merged, merged.info, name.merged, merged.size, merged.finish
    path = parts[0]
    info = read_gguf_info(path)
    if info.split_count > 1:
        raise ModelFileError(
            f"{path.name} is part {info.split_no + 1} of a model split into {info.split_count} files, but its name "
            f"does not say so; name the parts NAME-00001-of-{info.split_count:05d}.gguf and so on, and give the first"
        )
    try:
        reader = stack.enter_context(open(path, "rb"))
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from None
    return reader, info, path.name, os.fstat(reader.fileno()).st_size, lambda: []


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

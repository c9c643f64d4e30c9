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
from bundler.targets import check_stub, check_windows_size, sidecar_path
from runtime import __version__, bundle_format
from runtime.bundle_format import INLINE_FORMAT_VERSION, Manifest, ModelEntry
from runtime.errors import LlamaboxError, ModelFileError

# Given the total byte count, returns a context manager yielding a callback for bytes done.
LICENSE_LIMIT = 1 << 20

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
    platform: str | None = None,
    sidecar: bool = False,
    license_file: Path | None = None,
) -> Manifest:
    """Write a bundle of the model `source` names (see bundler.sources) on `stub` to `output`.

    With `sidecar`, the model goes into NAME.gguf beside `output` (see bundle_format). The stub, the
    arguments and the output path are checked before anything is downloaded, and the model before
    anything is written.
    """
    stub_info = check_stub(stub, platform)
    default_args = _split_args(args)
    license_text = read_license_file(license_file) if license_file is not None else None
    check_output(output, force)
    sidecar_out = sidecar_path(output) if sidecar else None
    if sidecar_out is not None:
        check_output(sidecar_out, force)
    fetched = fetch(source, revision)
    with ExitStack() as stack:
        model, info, file_name, size, part_hashes = _open_model(fetched, stack)
        check_windows_size(stub_info.platform, stub.stat().st_size, size, sidecar)
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
            license_text=license_text,
        )

        def complete(written: Manifest) -> Manifest:
            """Each source file's SHA-256: the model's own for a single file, the parts' for a merged split."""
            hashes = part_hashes() or [written.model.sha256]
            files = [dataclasses.replace(f, sha256=h) for f, h in zip(fetched.source.files, hashes)]
            return dataclasses.replace(written, source=dataclasses.replace(fetched.source, files=files))

        stub_file = stack.enter_context(open(stub, "rb"))
        advance = stack.enter_context(progress(size))
        out, side = _outputs(stack, output, sidecar_out, force)
        return bundle_format.write_bundle(out, stub_file, model, manifest, advance, complete, side)


def repack_bundle(
    old: Path,
    output: Path,
    stub: Path,
    *,
    platform: str | None = None,
    args: str | None = None,
    sidecar: bool | None = None,
    force: bool = False,
    progress: ProgressFactory,
) -> Manifest:
    """Write a new bundle of the model inside `old` on `stub`, with `args` (None: keep the old ones).

    The model region is copied from `old` (or its sidecar) and its SHA-256 checked against the old
    manifest while it is copied: a damaged model is refused and nothing is written. `sidecar`
    None keeps the old layout.
    """
    opened = bundle_format.open_bundle(old)
    keep_sidecar = opened.manifest.sidecar is not None if sidecar is None else sidecar
    stub_info = check_stub(stub, platform)
    default_args = opened.manifest.default_args if args is None else _split_args(args)
    if output.resolve() == old.resolve():
        raise LlamaboxError(f"{output} is the bundle being repacked; write the new one to another file")
    check_output(output, force)
    sidecar_out = sidecar_path(output) if keep_sidecar else None
    if sidecar_out is not None:
        if opened.manifest.sidecar is not None and sidecar_out.resolve() == opened.model_path.resolve():
            raise LlamaboxError(f"{sidecar_out} is the old bundle's model file; give the new bundle another name")
        check_output(sidecar_out, force)
    check_windows_size(stub_info.platform, stub.stat().st_size, opened.model_size, keep_sidecar)
    manifest = dataclasses.replace(
        opened.manifest,
        default_args=default_args,
        platform=stub_info.platform,
        runtime_version=stub_info.runtime_version,
        llamabox_version=__version__,
        built_at=_build_time(),
        format_version=INLINE_FORMAT_VERSION,
        sidecar=None,
    )
    expected = opened.manifest.model.sha256

    def check_hash(written: Manifest) -> Manifest:
        if written.model.sha256 != expected:
            raise LlamaboxError(
                f"the model inside {old.name} is damaged (its SHA-256 does not match its manifest); "
                "nothing was written: build the bundle again from the GGUF"
            )
        return written

    with ExitStack() as stack:
        model = stack.enter_context(bundle_format.ModelRegion(opened))
        stub_file = stack.enter_context(open(stub, "rb"))
        advance = stack.enter_context(progress(opened.model_size))
        out, side = _outputs(stack, output, sidecar_out, force)
        return bundle_format.write_bundle(out, stub_file, model, manifest, advance, check_hash, side)  # type: ignore[arg-type]


def _outputs(stack: ExitStack, output: Path, sidecar: Path | None, force: bool) -> tuple[BinaryIO, tuple[BinaryIO, str] | None]:
    """The executable's file and the sidecar's (with its name), each appearing only when written whole.

    The sidecar is entered last so that it is named first: an executable that appears always finds its
    sidecar beside it (were naming the executable then to fail, a stray .gguf would remain, never a
    bundle without its model)."""
    out = stack.enter_context(atomic_write(output, force=force, mode=0o755))
    if sidecar is None:
        return out, None
    return out, (stack.enter_context(atomic_write(sidecar, force=force, mode=0o644)), sidecar.name)


def read_license_file(path: Path) -> str:
    """The text of a licence file given with --license-file (UTF-8, at most 1 MB)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LlamaboxError(f"cannot read the licence file {path}: {exc.strerror}") from None
    if len(data) > LICENSE_LIMIT:
        raise LlamaboxError(f"the licence file {path} is {len(data):,} bytes; a licence text of at most 1 MB is expected")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LlamaboxError(f"the licence file {path} is not UTF-8 text") from None


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

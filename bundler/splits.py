"""Split GGUF models (NAME-00001-of-00003.gguf): naming the parts, checking them, and merging them into one GGUF.

Why the bundle holds one merged GGUF rather than the parts: the runtime maps the weights in place from
its own file through `llama_model_load_from_file_ptr`, which reads one GGUF from one FILE* and never
looks for further parts; llama.cpp opens the other parts of a split model only by path
(`llama_model_load_from_splits`), so the parts would have to be files of their own, which a single
executable is not. Merging is what llama.cpp's `llama-gguf-split --merge` does, and it is lossless:
a new header (written by llama.cpp's own GGUF code, `gguf_get_meta_data`, through ctypes) holding the
first part's metadata without the `split.*` keys and every part's tensor descriptions, followed by
each tensor's bytes exactly as they are in its part, padded to the GGUF alignment. The merge streams
straight into the bundle (no temporary file), hashing every part on the way for the manifest, and any
llamabox runtime, old or new, loads the result like any other model.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from bundler.gguf_info import GGUFInfo, InitParams, get_value, ggml_base, read_gguf_info, summarise
from runtime.errors import ModelFileError

_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
# The merged header is written with llama.cpp's default alignment, so a part's own is dropped.
_ALIGNMENT_KEY = "general.alignment"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class SplitName:
    """What a part's file name says: NAME-00002-of-00003.gguf is part 2 (`number`) of 3."""

    prefix: str
    number: int
    count: int

    def part(self, number: int) -> str:
        return f"{self.prefix}-{number:05d}-of-{self.count:05d}.gguf"

    @property
    def parts(self) -> list[str]:
        return [self.part(n) for n in range(1, self.count + 1)]

    @property
    def merged(self) -> str:
        """The name of the whole model: NAME.gguf."""
        return f"{self.prefix}.gguf"


def split_name(file_name: str) -> SplitName | None:
    """The split naming of `file_name` (a name, not a path), or None for an ordinary file."""
    match = _SPLIT_NAME.match(file_name)
    if not match:
        return None
    number, count = int(match["no"]), int(match["count"])
    if not 1 <= number <= count:
        return None
    return SplitName(match["prefix"], number, count)


def local_parts(path: Path) -> list[Path]:
    """All parts of the split model `path` belongs to, in order, or [path] for an ordinary file.

    A missing part is an error here, before anything is read or written.
    """
    name = split_name(path.name)
    if name is None or name.count == 1:
        return [path]
    parts = [path.with_name(part) for part in name.parts]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFileError(
            f"{path.name} is part {name.number} of a model split into {name.count} files, but "
            f"{_list(missing)} {'is' if len(missing) == 1 else 'are'} missing from {path.parent}; put all "
            f"{name.count} parts there"
        )
    return parts


@dataclass
class _Part:
    path: Path
    size: int
    # (file offset, size) of each tensor's bytes, in file order.
    tensors: list[tuple[int, int]] = field(default_factory=list)


class MergedGGUF:
    """The parts of a split model read as one GGUF file: seek(0) and read() only, streamed.

    Construction checks every part (each a whole GGUF, numbered in order, tensors counted) and builds
    the merged header; reading it all and then `finish()` hashes every part, whole.
    """

    def __init__(self, parts: list[Path]) -> None:
        self.parts = [_Part(path=p, size=0) for p in parts]
        self.header, self.info, alignment = _merged_header(self.parts)
        self.alignment = alignment
        self.size = len(self.header) + sum(_pad(size, alignment) for part in self.parts for _, size in part.tensors)
        self.part_sha256: list[str] = []
        self._buffer = bytearray()
        self._chunks = self._generate()

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0) or self._buffer or self.part_sha256:
            raise OSError("a merged split model can only be read once, from its start")
        return 0

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buffer) < n) and (chunk := next(self._chunks, None)) is not None:
            self._buffer += chunk
        n = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def finish(self) -> list[str]:
        """The SHA-256 of each part, once all `size` bytes have been read (reads the parts' tails, not merged)."""
        for chunk in self._chunks:
            if chunk:
                raise ModelFileError("the merged model is longer than its header says; build again")
        if self._buffer or len(self.part_sha256) != len(self.parts):
            raise ModelFileError("the merged model was not read to its end")
        return self.part_sha256

    def _generate(self):
        yield self.header
        for part in self.parts:
            digest = hashlib.sha256()
            try:
                with open(part.path, "rb") as f:
                    position = 0
                    for start, size in part.tensors:
                        for _chunk in _read_range(f, position, start, part.path):  # between tensors: hashed only
                            digest.update(_chunk)
                        for chunk in _read_range(f, start, start + size, part.path):
                            digest.update(chunk)
                            yield chunk
                        yield bytes(_pad(size, self.alignment) - size)
                        position = start + size
                    for chunk in _read_range(f, position, part.size, part.path):
                        digest.update(chunk)
                    if f.read(1):
                        raise ModelFileError(f"{part.path.name} grew while it was being read; build again")
            except OSError as exc:
                raise ModelFileError(f"cannot read {part.path}: {exc.strerror or exc}") from None
            self.part_sha256.append(digest.hexdigest())


def _read_range(f, start: int, end: int, path: Path):
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise ModelFileError(f"{path.name} became shorter while it was being read; build again")
        left -= len(chunk)
        yield chunk


def _pad(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


def _merged_header(parts: list[_Part]) -> tuple[bytes, GGUFInfo, int]:
    """Check the parts and write the merged header with llama.cpp's GGUF code; also the merged summary."""
    for index, part in enumerate(parts):
        info = read_gguf_info(part.path)  # whole, readable GGUF: the same checks as for any model
        if (info.split_no, info.split_count) != (index, len(parts)):
            raise ModelFileError(
                f"{part.path.name} says it is part {info.split_no + 1} of {info.split_count}, but its name makes it "
                f"part {index + 1} of {len(parts)}; the parts do not belong together"
            )
        part.size = part.path.stat().st_size
    lib = ggml_base()
    out = lib.gguf_init_empty()
    try:
        expected = None
        for index, part in enumerate(parts):
            found = _add_part_tensors(lib, out, part, first=index == 0)
            expected = found if index == 0 else expected
        n_tensors = lib.gguf_get_n_tensors(out)
        if isinstance(expected, int) and expected != n_tensors:
            raise ModelFileError(
                f"the parts of {parts[0].path.name} hold {n_tensors} tensors, but its metadata says {expected}; "
                "a part is from another model or damaged"
            )
        header = ctypes.create_string_buffer(lib.gguf_get_meta_size(out))
        lib.gguf_get_meta_data(out, header)
        return header.raw, summarise(lib, out, lib.gguf_get_version(out)), lib.gguf_get_alignment(out)
    finally:
        lib.gguf_free(out)


def _add_part_tensors(lib: ctypes.CDLL, out: int, part: _Part, first: bool) -> int | str | None:
    """Add `part`'s tensors (in file order) to the merged header `out`; the first part also gives the metadata.

    Returns the first part's `split.tensors.count`.
    """
    meta = ctypes.c_void_p()
    ctx = lib.gguf_init_from_file(str(part.path).encode(), InitParams(no_alloc=True, ctx=ctypes.addressof(meta)))
    if not ctx:
        raise ModelFileError(f"{part.path.name} is not a valid GGUF file; is it damaged or incomplete?")
    try:
        expected = get_value(lib, ctx, "split.tensors.count") if first else None
        if first:
            lib.gguf_set_kv(out, ctx)
            for key in (*_SPLIT_KEYS, _ALIGNMENT_KEY):
                lib.gguf_remove_key(out, key.encode())
        data_offset = lib.gguf_get_data_offset(ctx)
        order = sorted(range(lib.gguf_get_n_tensors(ctx)), key=lambda i: lib.gguf_get_tensor_offset(ctx, i))
        end = data_offset
        for i in order:
            name = lib.gguf_get_tensor_name(ctx, i)
            start, size = data_offset + lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i)
            if start < end:
                raise ModelFileError(f"{part.path.name} has overlapping tensors; is it damaged?")
            if lib.gguf_find_tensor(out, name) >= 0:
                raise ModelFileError(
                    f"tensor {name.decode(errors='replace')} is in more than one part of {part.path.name}'s model; "
                    "a part is from another model"
                )
            tensor = lib.ggml_get_tensor(meta, name)
            if not tensor:
                raise ModelFileError(f"{part.path.name} is not a valid GGUF file; is it damaged or incomplete?")
            lib.gguf_add_tensor(out, tensor)
            part.tensors.append((start, size))
            end = start + size
        return expected
    finally:
        lib.gguf_free(ctx)
        if meta:
            lib.ggml_free(meta)


def _list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

"""The oldest glibc a Linux runtime stub runs on: the highest GLIBC_x.y any of its ELF files needs.

An ELF file records, per shared library it links against, the symbol versions it needs
(`.gnu.version_r`, what `objdump -T` and `ldd -v` show). The dynamic loader refuses to start a
program whose libraries lack one of them (`version 'GLIBC_2.35' not found`), so the highest
GLIBC_x.y over the bootloader and every library in the stub's PyInstaller archive is the oldest
glibc the stub starts on. build.py records it in the stub's description; the tests and
`llamabox inspect` read it back.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime import bundle_format

ELF_MAGIC = b"\x7fELF"
_SHT_GNU_VERNEED = 0x6FFFFFFE
_GLIBC_VERSION = re.compile(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?$")

Version = tuple[int, ...]

# The key in the stub's description (runtime.platform_tag.STUB_INFO_NAME) that records highest() of the stub.
MIN_GLIBC_KEY = "min_glibc"

# What the portable stub (scripts/build_portable.sh) needs at most: Debian 11's glibc.
TARGET: Version = (2, 31)

# The glibc of long-lived x86-64 distributions, oldest first: a stub runs where glibc >= its needs.
DISTRIBUTIONS: tuple[tuple[Version, str], ...] = (
    ((2, 17), "RHEL/CentOS 7"),
    ((2, 27), "Ubuntu 18.04"),
    ((2, 28), "Debian 10, RHEL/Rocky/Alma 8"),
    ((2, 31), "Debian 11, Ubuntu 20.04"),
    ((2, 34), "RHEL/Rocky/Alma 9"),
    ((2, 35), "Ubuntu 22.04"),
    ((2, 36), "Debian 12"),
    ((2, 39), "Ubuntu 24.04"),
    ((2, 41), "Debian 13"),
)


@dataclass(frozen=True)
class ElfNeeds:
    """What one ELF file in a stub needs from glibc."""

    name: str
    glibc: Version | None  # None: no versioned glibc symbol at all


def parse_version(text: str) -> Version:
    """'2.31' -> (2, 31); ValueError for anything else."""
    parts = tuple(int(p) for p in text.split("."))
    if len(parts) < 2:
        raise ValueError(f"not a glibc version: {text!r} (expected e.g. 2.31)")
    return parts


def format_version(version: Version | None) -> str:
    return ".".join(map(str, version)) if version else "none"


def version_needs(data: bytes) -> set[str]:
    """Every symbol version an ELF file needs from its libraries ('GLIBC_2.14', 'GLIBCXX_3.4.21', ...).

    Reads the section headers and the GNU version-needs section; ValueError if `data` is not an ELF file.
    """
    if not data.startswith(ELF_MAGIC) or len(data) < 64:
        raise ValueError("not an ELF file")
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        section = struct.Struct(end + "IIQQQQIIQQ")
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        section = struct.Struct(end + "IIIIIIIIII")
    sections = [section.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    needs: set[str] = set()
    for _name, kind, _flags, _addr, offset, _size, link, count, _align, _entsize in sections:
        if kind != _SHT_GNU_VERNEED:
            continue
        strings = sections[link][4]
        entry = offset
        for _ in range(count):
            _version, aux_count, _file, aux, next_entry = struct.unpack_from(end + "HHIII", data, entry)
            at = entry + aux
            for _ in range(aux_count):
                _hash, _flags2, _other, name, next_aux = struct.unpack_from(end + "IHHII", data, at)
                needs.add(_c_string(data, strings + name))
                at += next_aux
            entry += next_entry
    return needs


def glibc_needed(data: bytes) -> Version | None:
    """The highest GLIBC_x.y an ELF file needs, None if it needs no versioned glibc symbol."""
    versions = [_GLIBC_VERSION.match(n) for n in version_needs(data)]
    return max((tuple(int(g) for g in m.groups() if g is not None) for m in versions if m), default=None)


def runs_on(version: Version) -> str:
    """The distributions whose glibc is new enough, e.g. 'Debian 11, Ubuntu 20.04 and newer'."""
    oldest = [names for have, names in DISTRIBUTIONS if have >= version]
    return f"{', '.join(oldest[:2])} and newer" if oldest else "only the newest distributions"


def file_glibc(path: Path) -> Version | None:
    """glibc_needed() of a file; None for a file that is not ELF."""
    with open(path, "rb") as f:
        if f.read(4) != ELF_MAGIC:
            return None
    return glibc_needed(path.read_bytes())


def record_min_glibc(info: str, files: list[str]) -> None:
    """For build.py's spec: add `min_glibc` (bootloader and collected files) to the stub's description."""
    import PyInstaller

    if not sys.platform.startswith("linux"):
        return
    bootloader = Path(PyInstaller.__file__).parent / "bootloader" / PyInstaller.PLATFORM / "run"
    paths = [bootloader, *(Path(f) for f in files if Path(f).is_file())]
    newest = max((v for v in map(file_glibc, paths) if v), default=None)
    description = json.loads(Path(info).read_text())
    description[MIN_GLIBC_KEY] = format_version(newest) if newest else None
    Path(info).write_text(json.dumps(description, indent=2))


def stub_needs(stub: Path) -> list[ElfNeeds]:
    """What each ELF file of a stub needs: a launcher stub's runtime files, or a onefile stub's bootloader and archive."""
    return [ElfNeeds(name, glibc_needed(data)) for name, data in elf_files(stub)]


def highest(needs: list[ElfNeeds]) -> Version | None:
    return max((n.glibc for n in needs if n.glibc), default=None)


def elf_files(stub: Path) -> Iterator[tuple[str, bytes]]:
    """(name, contents) of each ELF file in a stub: "(bootloader)" first, then the libraries by their path
    in the runtime's folder (as PyInstaller names them: libpython3.11.so.1.0, llama_cpp/lib/libllama.so)."""
    with open(stub, "rb") as f:
        header = bundle_format.read_stub_header(f)
        if header is not None:  # the launcher layout: the runtime's files are in its .tar.gz payload
            f.seek(header.payload_offset)
            with tarfile.open(fileobj=io.BytesIO(f.read(header.payload_size)), mode="r:gz") as tar:
                for member in tar:
                    data = tar.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
                    if data.startswith(ELF_MAGIC):
                        top_level = "/" not in member.name  # the one-folder build's executable: its bootloader
                        yield "(bootloader)" if top_level else member.name.removeprefix("_internal/"), data
            return
    from PyInstaller.archive.readers import CArchiveReader

    yield "(bootloader)", stub.read_bytes()
    archive = CArchiveReader(str(stub))
    for name in archive.toc:
        data = archive.extract(name)
        if data and data.startswith(ELF_MAGIC):
            yield name, data


def _c_string(data: bytes, at: int) -> str:
    return data[at : data.index(b"\0", at)].decode("ascii", "replace")

"""The bundle format on its own: layout, trailer, checks, reproducibility. Uses a fake stub."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
from pathlib import Path

import pytest

from runtime import bundle_format
from runtime.bundle_format import ALIGNMENT, TRAILER_SIZE, Manifest, ModelEntry, Source, SourceFile
from runtime.errors import BundleError, IncompleteBundleError

MODEL = b"GGUF" + bytes(range(256)) * 400  # larger than the few KiB a bare stub may carry after its archive


def fake_stub(archive_payload: bytes = b"PKG-CONTENTS" * 10, after: bytes = b"ELF-SECTION-HEADERS") -> bytes:
    """A bootloader, a PyInstaller-like archive ending in its cookie, then ELF section headers."""
    archive_len = len(archive_payload) + 88
    toc_len = 20  # the table of contents ends the payload, right before the cookie
    cookie = struct.pack(
        "!8sIIII64s", bundle_format.PYINSTALLER_COOKIE_MAGIC, archive_len, len(archive_payload) - toc_len, toc_len, 311, b"libpython3.11.so"
    )
    # The bootloader's code holds the magic too, without a cookie around it.
    bootloader = b"\x7fELF-bootloader" + bundle_format.PYINSTALLER_COOKIE_MAGIC + b"code" * 30
    return bootloader + archive_payload + cookie + after


LAUNCHER_TEMPLATE = (Path(__file__).resolve().parent.parent / "runtime" / "launcher.sh").read_text()
LAUNCHER_FIELDS = {"EXECUTABLE": "rt", "UNPACKED_MB": "1", "NEEDED_FILES": "rt:10", "CACHE_HOME": "$HOME/.cache"}


def fake_launcher_stub(payload: bytes = b"\x1f\x8b-TAR-GZ" * 1000) -> bytes:
    """The real launcher script, filled in, then a payload (not a real .tar.gz: the format does not look inside)."""
    return bundle_format.launcher_header(LAUNCHER_TEMPLATE, LAUNCHER_FIELDS, payload, {"platform": "linux-x86_64"}) + payload


@pytest.fixture(params=["onefile", "launcher"])
def stub(request: pytest.FixtureRequest) -> bytes:
    """Each kind of stub, for what both layouts must do alike."""
    return fake_stub() if request.param == "onefile" else fake_launcher_stub()


def manifest(size: int = len(MODEL)) -> Manifest:
    return Manifest(
        name="test",
        model=ModelEntry(file_name="m.gguf", size=size, sha256=""),
        metadata={"architecture": "llama"},
        default_args=["--temp", "0"],
        platform="linux-x86_64",
        runtime_version="0.1.0",
        llamabox_version="0.1.0",
        built_at="2026-01-01T00:00:00Z",
    )


def write(tmp_path: Path, stub: bytes = fake_stub(), model: bytes = MODEL) -> Path:
    out = tmp_path / "b.run"
    with open(out, "wb") as f:
        bundle_format.write_bundle(f, io.BytesIO(stub), io.BytesIO(model), manifest(len(model)))
    return out


def test_layout_model_aligned_and_archive_copied_last(tmp_path: Path) -> None:
    stub = fake_stub()
    path = write(tmp_path, stub)
    data = path.read_bytes()
    bundle = bundle_format.open_bundle(path)
    t = bundle.trailer
    assert data[: len(stub)] == stub
    assert t.model_offset % ALIGNMENT == 0 and t.model_offset >= len(stub)
    assert data[t.model_offset : t.model_offset + t.model_size] == MODEL
    # The stub's archive (up to and including its cookie) is repeated right before the trailer,
    # so a backward cookie scan from the end stops within TRAILER_SIZE bytes.
    start, end = bundle_format.find_pyinstaller_archive(io.BytesIO(stub), len(stub))
    assert data[t.archive_offset : t.archive_offset + t.archive_size] == stub[start:end]
    assert t.archive_offset + t.archive_size == len(data) - TRAILER_SIZE
    assert bundle_format.find_pyinstaller_archive(io.BytesIO(data), len(data)) == (t.archive_offset, len(data) - TRAILER_SIZE)


def test_launcher_layout_payload_then_model_and_no_copy(tmp_path: Path) -> None:
    stub = fake_launcher_stub()
    path = write(tmp_path, stub)
    data = path.read_bytes()
    bundle = bundle_format.open_bundle(path)
    t = bundle.trailer
    header = bundle_format.read_stub_header(io.BytesIO(data))
    assert header is not None and header.description == {"platform": "linux-x86_64"}
    assert data[: len(stub)] == stub and header.payload_end == len(stub)
    assert (t.archive_offset, t.archive_size) == (header.payload_offset, header.payload_size)
    assert header.payload_offset % ALIGNMENT == 0 and t.model_offset == bundle_format.align_up(len(stub))
    assert data[t.model_offset : t.model_offset + t.model_size] == MODEL
    assert t.manifest_offset + t.manifest_size == len(data) - TRAILER_SIZE  # no archive copy
    assert t.format_version == bundle.manifest.format_version == bundle_format.LAUNCHER_FORMAT_VERSION
    # The launcher's own numbers: where dd starts reading, in 4 KiB blocks, and the size a whole stub has at least.
    text = data[: header.payload_offset].decode()
    assert f"skip={header.payload_offset // ALIGNMENT}\n" in text and f"end={header.payload_end}\n" in text
    assert f"id={header.runtime_id}\n" in text


def test_launcher_cut_inside_its_runtime_is_incomplete(tmp_path: Path) -> None:
    path = write(tmp_path, fake_launcher_stub())
    header = bundle_format.read_stub_header(io.BytesIO(path.read_bytes()))
    assert header is not None
    path.write_bytes(path.read_bytes()[: header.payload_offset + 100])
    with pytest.raises(IncompleteBundleError, match="incomplete.*cut short"):
        bundle_format.open_bundle(path)


def test_launcher_template_fields_must_all_be_given() -> None:
    with pytest.raises(ValueError, match="@CACHE_HOME@"):
        bundle_format.launcher_header(LAUNCHER_TEMPLATE, {k: v for k, v in LAUNCHER_FIELDS.items() if k != "CACHE_HOME"}, b"x", {})


def tiny_pe(body: bytes = b"", security: tuple[int, int] = (0, 0)) -> bytes:
    """A Windows program's headers (PE32+, one section holding `body`), as the format reads them: no code."""
    head = bytearray(0x200)
    head[0:2] = bundle_format.EXE_MAGIC
    struct.pack_into("<I", head, 0x3C, 0x80)
    head[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HH", head, 0x86, 1, 0)  # NumberOfSections (TimeDateStamp follows)
    struct.pack_into("<H", head, 0x94, 0xF0)  # SizeOfOptionalHeader
    struct.pack_into("<H", head, 0x98, 0x20B)  # PE32+
    struct.pack_into("<II", head, 0x98 + 144, *security)  # the security directory: a signature's offset and size
    struct.pack_into("<II", head, 0x188 + 16, len(body), 0x200)  # the section: SizeOfRawData, PointerToRawData
    return bytes(head) + body


def test_windows_launcher_layout_is_found_after_the_program_never_inside_it(tmp_path: Path) -> None:
    # The launcher's own code holds the line's prefix as a string: only the line after its last section counts.
    launcher = tiny_pe(b'\n# llamabox-stub: {"not": "this"}\n' + b"code" * 100)
    payload = b"\x1f\x8b-TAR-GZ" * 1000
    stub = bundle_format.exe_launcher_header(launcher, payload, {"platform": "windows-x86_64", "executable": "rt.exe"}) + payload
    header = bundle_format.read_stub_header(io.BytesIO(stub))
    assert header is not None and header.description["executable"] == "rt.exe"
    assert header.payload_offset % ALIGNMENT == 0 and header.payload_end == len(stub) and stub.startswith(launcher)
    bundle = bundle_format.open_bundle(write(tmp_path, stub))
    assert bundle.trailer.format_version == bundle_format.LAUNCHER_FORMAT_VERSION
    with pytest.raises(ValueError, match="must end with its last section"):
        bundle_format.exe_launcher_header(launcher + b"signature", payload, {})


def test_a_signature_appended_to_a_windows_bundle_is_not_damage(tmp_path: Path) -> None:
    """Authenticode puts the signature after everything, zero-padded to 8 bytes, and says where in the PE header."""
    path = write(tmp_path, fake_stub())
    unsigned = path.read_bytes()
    padding = -len(unsigned) % 8
    signature = b"PKCS7-SIGNATURE" * 20
    header = tiny_pe(security=(len(unsigned) + padding, len(signature)))
    signed = header + unsigned[len(header) :] + b"\0" * padding + signature
    path.write_bytes(signed)
    bundle = bundle_format.open_bundle(path)
    assert bundle.trailer.bundle_size == len(unsigned) and bundle_format.hash_model(bundle) == bundle.manifest.model.sha256
    path.write_bytes(signed[:-1])  # a signature that does not reach the end is not one
    with pytest.raises(BundleError):
        bundle_format.open_bundle(path)


def test_manifest_round_trip_and_hash(tmp_path: Path, stub: bytes) -> None:
    import hashlib

    bundle = bundle_format.open_bundle(write(tmp_path, stub))
    assert bundle.manifest.model.sha256 == hashlib.sha256(MODEL).hexdigest()
    assert bundle.manifest.default_args == ["--temp", "0"]
    assert bundle_format.hash_model(bundle) == bundle.manifest.model.sha256


def test_same_inputs_give_identical_bytes(tmp_path: Path, stub: bytes) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert write(tmp_path / "a", stub).read_bytes() == write(tmp_path / "b", stub).read_bytes()


@pytest.mark.parametrize("cut", [1, TRAILER_SIZE, 5000, len(MODEL) // 4])
def test_truncated_bundle_is_reported_as_incomplete(tmp_path: Path, stub: bytes, cut: int) -> None:
    path = write(tmp_path, stub)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(IncompleteBundleError, match="incomplete.*cut short"):
        bundle_format.open_bundle(path)


def test_bare_stub_is_told_apart_from_a_broken_bundle(tmp_path: Path, stub: bytes) -> None:
    path = tmp_path / "stub"
    path.write_bytes(stub)
    with pytest.raises(BundleError, match="stub without a model") as info:
        bundle_format.open_bundle(path)
    assert not isinstance(info.value, IncompleteBundleError)


def test_flipped_model_byte_passes_open_but_fails_hash(tmp_path: Path, stub: bytes) -> None:
    path = write(tmp_path, stub)
    bundle = bundle_format.open_bundle(path)
    data = bytearray(path.read_bytes())
    data[bundle.model_offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = bundle_format.open_bundle(path)  # the cheap start-up check does not hash
    assert bundle_format.hash_model(reopened) != reopened.manifest.model.sha256


def test_appended_bytes_are_detected(tmp_path: Path, stub: bytes) -> None:
    path = write(tmp_path, stub)
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(BundleError):
        bundle_format.open_bundle(path)


def test_damaged_manifest(tmp_path: Path, stub: bytes) -> None:
    path = write(tmp_path, stub)
    bundle = bundle_format.open_bundle(path)
    data = bytearray(path.read_bytes())
    data[bundle.trailer.manifest_offset] = ord("X")
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="manifest is damaged"):
        bundle_format.open_bundle(path)


def test_gguf_and_other_files_are_not_bundles(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(MODEL)
    with pytest.raises(BundleError, match="is a GGUF model, not a llamabox bundle"):
        bundle_format.open_bundle(gguf)
    other = tmp_path / "notes.txt"
    other.write_bytes(b"hello" * 10000)
    with pytest.raises(BundleError, match="is not a llamabox bundle"):
        bundle_format.open_bundle(other)


def test_stub_without_archive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="neither a llamabox launcher nor a PyInstaller executable"):
        bundle_format.write_bundle(io.BytesIO(), io.BytesIO(b"not a stub"), io.BytesIO(MODEL), manifest())


def test_a_reader_ignores_manifest_keys_it_does_not_know(tmp_path: Path) -> None:
    """A newer llamabox may add manifest fields at any depth: this reader (the 'old' one then) still reads the bundle."""

    @dataclasses.dataclass(frozen=True)
    class NewerManifest(Manifest):
        sidecar: dict = dataclasses.field(default_factory=lambda: {"file": "model.weights", "offset": 0})

    newer = NewerManifest(**{f.name: getattr(manifest(), f.name) for f in dataclasses.fields(Manifest)})
    out = tmp_path / "b.run"
    with open(out, "wb") as f:
        bundle_format.write_bundle(f, io.BytesIO(fake_stub()), io.BytesIO(MODEL), newer)
    assert b'"sidecar"' in out.read_bytes()
    read = bundle_format.open_bundle(out).manifest
    assert type(read) is Manifest and read.name == "test" and read.default_args == ["--temp", "0"]

    raw = json.loads(read.to_json())
    raw["model"]["compression"] = "none"
    raw["source"] = {"kind": "hub", "repo": "o/r", "mirror": "x", "files": [{"name": "m.gguf", "size": 1, "sha256": "ab", "xet": 1}]}
    parsed = Manifest.from_json(json.dumps(raw).encode())
    assert parsed.model == read.model
    assert parsed.source == Source(kind="hub", repo="o/r", files=[SourceFile(name="m.gguf", size=1, sha256="ab")])


def test_version_1_manifest_without_source_still_reads() -> None:
    raw = json.loads(manifest().to_json())
    del raw["source"]
    raw["format_version"] = 1
    parsed = Manifest.from_json(json.dumps(raw).encode())
    assert parsed.source is None and parsed.format_version == 1


def test_manifest_missing_a_required_key_is_damaged() -> None:
    raw = json.loads(manifest().to_json())
    del raw["model"]["sha256"]
    with pytest.raises(BundleError, match="manifest is damaged"):
        Manifest.from_json(json.dumps(raw).encode())


def test_sidecar_layout_of_each_stub_kind(tmp_path: Path, stub: bytes) -> None:
    out, side = tmp_path / "s.run", tmp_path / "s.gguf"
    with open(out, "wb") as f, open(side, "wb") as g:
        written = bundle_format.write_bundle(f, io.BytesIO(stub), io.BytesIO(MODEL), manifest(), sidecar=(g, side.name))
    assert side.read_bytes() == MODEL
    data = out.read_bytes()
    assert data[: len(stub)] == stub and len(data) < len(stub) + 4096 + TRAILER_SIZE  # the model is not inside
    bundle = bundle_format.open_bundle(out)
    launcher = bundle_format.read_stub_header(io.BytesIO(stub)) is not None
    expected = bundle_format.LAUNCHER_FORMAT_VERSION if launcher else bundle_format.SIDECAR_FORMAT_VERSION
    assert bundle.trailer.format_version == written.format_version == expected
    assert bundle.trailer.flags & bundle_format.FLAG_SIDECAR and bundle.model_path == side
    assert bundle_format.hash_model(bundle) == written.model.sha256 == written.sidecar.sha256
    side.write_bytes(MODEL[:-10])
    with pytest.raises(BundleError, match="copy it again"):
        bundle_format.open_bundle(out)


def companion(role: str, data: bytes, scale: float | None = None) -> tuple[bundle_format.Companion, io.BytesIO]:
    return bundle_format.Companion(role, f"{role}.gguf", 0, len(data), "", scale), io.BytesIO(data)


def test_companions_follow_the_model_aligned_and_hashed(tmp_path: Path, stub: bytes) -> None:
    draft, adapter = b"GGUF" + b"d" * 5000, b"GGUF" + b"a" * 300
    out = tmp_path / "b.run"
    with open(out, "wb") as f:
        bundle_format.write_bundle(f, io.BytesIO(stub), io.BytesIO(MODEL), manifest(), companions=[companion("draft", draft), companion("lora", adapter, 0.5)])
    bundle = bundle_format.open_bundle(out)
    data = out.read_bytes()
    carried = bundle.manifest.companions
    assert [(c.role, c.scale) for c in carried] == [("draft", None), ("lora", 0.5)]
    assert carried[0].offset >= bundle.model_offset + bundle.model_size
    for c, expected in zip(carried, (draft, adapter)):
        assert c.offset % ALIGNMENT == 0 and data[c.offset : c.offset + c.size] == expected
        assert c.sha256 == bundle_format.hash_region(out, c.offset, c.size) == hashlib.sha256(expected).hexdigest()
    assert carried[1].offset + carried[1].size <= bundle.trailer.manifest_offset


def test_a_manifest_that_puts_a_companion_where_none_is_is_damage(tmp_path: Path) -> None:
    out = tmp_path / "b.run"
    with open(out, "wb") as f:
        written = bundle_format.write_bundle(f, io.BytesIO(fake_launcher_stub()), io.BytesIO(MODEL), manifest(), companions=[companion("draft", b"GGUF" + b"d" * 100)])
    bundle = bundle_format.open_bundle(out)
    data = bytearray(out.read_bytes())
    offset = written.companions[0].offset
    data[offset : offset + 4] = b"XXXX"
    out.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="has no GGUF where its manifest puts draft.gguf"):
        bundle_format.open_bundle(out)
    assert bundle.manifest.companions[0].offset == offset


def test_the_sidecar_layout_carries_no_companions(tmp_path: Path) -> None:
    with open(tmp_path / "b.run", "wb") as f, open(tmp_path / "b.gguf", "wb") as side:
        with pytest.raises(BundleError, match="the sidecar layout keeps one model"):
            bundle_format.write_bundle(f, io.BytesIO(fake_stub()), io.BytesIO(MODEL), manifest(), sidecar=(side, "b.gguf"), companions=[companion("draft", b"GGUF")])

"""`llamabox build / inspect / verify` with the real stub and SmolLM2, and every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime import bundle_format
from tests.conftest import SOURCE_DATE_EPOCH, damaged_copy, llamabox
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow


def assert_user_error(result, pattern: str) -> None:
    """A non-zero exit, no traceback, and one 'Error: ...' line that says what is wrong.

    Usage mistakes caught by click itself (exit code 2) also print the usage line above it.
    """
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert pattern.lower() in errors[0].lower(), errors[0]


def no_leftovers(directory: Path) -> None:
    assert not [p for p in directory.iterdir() if p.name.endswith(".partial")]


def test_bundle_layout(bundle: Path, smollm2: Path, stub: Path) -> None:
    opened = bundle_format.open_bundle(bundle)
    t = opened.trailer
    assert os.access(bundle, os.X_OK)
    assert t.model_offset % 4096 == 0
    with open(bundle, "rb") as b, open(smollm2, "rb") as m:
        b.seek(t.model_offset)
        assert b.read(t.model_size) == m.read()
        b.seek(0)
        assert b.read(stub.stat().st_size) == stub.read_bytes()
    # What the bundle adds over the model: the stub, alignment padding, the manifest and a copy of
    # the stub's archive (so that the bootloader finds it at the end).
    assert t.bundle_size - t.model_size < 2 * stub.stat().st_size + 4096 + 64 * 1024


def test_reproducible_with_source_date_epoch(bundle: Path, smollm2: Path, stub: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.run"
    result = llamabox("build", smollm2, "-o", again, "--stub", stub, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == bundle.read_bytes()
    assert bundle_format.open_bundle(again).manifest.built_at == "2026-01-01T00:00:00Z"


def test_inspect(bundle: Path) -> None:
    result = llamabox("inspect", bundle)
    assert result.returncode == 0, result.stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in result.stdout
    assert "apache-2.0" in result.stdout and "Chat template:    yes" in result.stdout
    as_json = json.loads(llamabox("inspect", "--json", bundle).stdout)
    assert as_json["metadata"]["architecture"] == "llama"
    assert as_json["metadata"]["context_length"] == 8192
    assert as_json["model"]["size"] == 98_362_432
    assert as_json["platform"] == "linux-x86_64"
    assert len(as_json["model"]["sha256"]) == 64


def test_verify_ok_and_flipped_byte(bundle: Path, tmp_path: Path) -> None:
    result = llamabox("verify", bundle)
    assert result.returncode == 0 and result.stdout.startswith("OK"), result
    damaged = damaged_copy(bundle, tmp_path, 50_000_000)
    assert_user_error(llamabox("verify", damaged), "embedded model is damaged")


def test_args_are_baked_in(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    out = tmp_path / "pirate.run"
    result = llamabox("build", smollm2, "-o", out, "--stub", stub, "--name", "pirate", "--args", "--system-prompt 'You are a pirate.' --temp 0")
    assert result.returncode == 0, result.stderr
    manifest = bundle_format.open_bundle(out).manifest
    assert manifest.name == "pirate"
    assert manifest.default_args == ["--system-prompt", "You are a pirate.", "--temp", "0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--no-such-option", "no such option"),
        ("--port notanumber", "--port"),
        ("--system-prompt 'unclosed", "cannot be parsed"),
    ],
)
def test_bad_baked_args(smollm2: Path, stub: Path, tmp_path: Path, args: str, message: str) -> None:
    assert_user_error(llamabox("build", smollm2, "-o", tmp_path / "x.run", "--stub", stub, "--args", args), message)
    assert not (tmp_path / "x.run").exists()
    no_leftovers(tmp_path)


def test_not_gguf(stub: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file" * 100)
    assert_user_error(llamabox("build", bogus, "-o", tmp_path / "x.run", "--stub", stub), "not a GGUF model file")
    assert not (tmp_path / "x.run").exists()


def test_truncated_gguf(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as src:
        cut.write_bytes(src.read(60_000_000))
    assert_user_error(llamabox("build", cut, "-o", tmp_path / "x.run", "--stub", stub), "truncated")
    assert not (tmp_path / "x.run").exists()


def test_missing_and_unreadable_model(stub: Path, tmp_path: Path) -> None:
    assert_user_error(llamabox("build", tmp_path / "nope.gguf", "-o", tmp_path / "x.run", "--stub", stub), "not found")
    assert_user_error(llamabox("build", tmp_path, "-o", tmp_path / "x.run", "--stub", stub), "directory")


def test_output_in_missing_directory(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    assert_user_error(llamabox("build", smollm2, "-o", tmp_path / "nodir" / "x.run", "--stub", stub), "does not exist")


def test_output_in_read_only_directory(smollm2: Path, stub: Path, tmp_path: Path, chattr_readonly) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    chattr_readonly(locked)
    assert_user_error(llamabox("build", smollm2, "-o", locked / "x.run", "--stub", stub), "cannot write")


def test_existing_output_needs_force(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.run"
    out.write_text("precious")
    assert_user_error(llamabox("build", smollm2, "-o", out, "--stub", stub), "--force")
    assert out.read_text() == "precious"
    assert llamabox("build", smollm2, "-o", out, "--stub", stub, "--force").returncode == 0
    assert bundle_format.open_bundle(out).manifest.model.size == smollm2.stat().st_size


@pytest.mark.parametrize("kind", ["elf", "text", "bundle", "missing"])
def test_bad_stub(smollm2: Path, bundle: Path, tmp_path: Path, kind: str) -> None:
    stubs = {"elf": Path("/bin/ls"), "text": tmp_path / "stub.txt", "bundle": bundle, "missing": tmp_path / "nostub"}
    (tmp_path / "stub.txt").write_text("#!/bin/sh\necho hi\n")
    message = {"bundle": "already a llamabox bundle", "missing": "not found"}.get(kind, "not a llamabox runtime stub")
    assert_user_error(llamabox("build", smollm2, "-o", tmp_path / "x.run", "--stub", stubs[kind]), message)
    assert not (tmp_path / "x.run").exists()
    no_leftovers(tmp_path)


def test_interrupted_write_leaves_nothing(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    """A model that is not whole (tensors past its end) is refused before writing anything."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    tiny.write_bytes(tiny.read_bytes()[:-100])
    assert_user_error(llamabox("build", tiny, "-o", tmp_path / "x.run", "--stub", stub), "truncated")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_inspect_and_verify_on_non_bundles(tmp_path: Path, smollm2: Path) -> None:
    assert_user_error(llamabox("inspect", tmp_path / "missing.run"), "cannot read")
    assert_user_error(llamabox("verify", smollm2), "is a GGUF model, not a llamabox bundle")

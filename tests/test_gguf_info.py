"""Validating and summarising GGUF files before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundler.gguf_info import read_gguf_info
from runtime.errors import ModelFileError
from tests.tiny_gguf import write_tiny_gguf


def test_summary_of_a_tiny_gguf(tmp_path: Path) -> None:
    info = read_gguf_info(write_tiny_gguf(tmp_path / "t.gguf", chat_template="{{ messages }}"))
    assert info.gguf_version == 3
    assert info.architecture == "llama"
    assert info.name == "Tiny Test Model"
    assert info.context_length == 256
    assert info.license == "mit"
    assert info.has_chat_template
    assert info.parameter_count == 32 * 16 + 16


def test_summary_of_smollm2(smollm2: Path) -> None:
    info = read_gguf_info(smollm2)
    assert (info.architecture, info.context_length, info.license) == ("llama", 8192, "apache-2.0")
    assert info.has_chat_template
    assert 130_000_000 < info.parameter_count < 140_000_000


def test_no_template_no_license(tmp_path: Path) -> None:
    info = read_gguf_info(write_tiny_gguf(tmp_path / "t.gguf", license=None))
    assert not info.has_chat_template and info.license is None


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("hello, I am a text file")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        read_gguf_info(path)


@pytest.mark.parametrize("keep", [6, 40, -8])
def test_truncated_gguf(tmp_path: Path, keep: int) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ModelFileError, match="truncated|not a valid GGUF"):
        read_gguf_info(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_gguf_info(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="is a directory"):
        read_gguf_info(tmp_path)

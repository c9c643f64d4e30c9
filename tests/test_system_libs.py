"""Choosing the newer libstdc++ (runtime/system_libs.py): GPU drivers need the machine's when it is newer."""

from __future__ import annotations

from pathlib import Path

from runtime.system_libs import cxx_abi_level, prefer_newer_cxx_runtime


def fake_libstdcxx(path: Path, *versions: str) -> Path:
    path.write_bytes(b"\x7fELF" + b"".join(f"GLIBCXX_{v}\x00".encode() for v in versions) + b"GLIBCXX_TUNABLES\x00")
    return path


def test_the_newest_symbol_version_is_read(tmp_path: Path) -> None:
    assert cxx_abi_level(fake_libstdcxx(tmp_path / "a", "3.4", "3.4.9", "3.4.28", "3.4.3")) == (3, 4, 28)
    assert cxx_abi_level(tmp_path / "missing") == ()


def test_the_carried_one_stays_when_it_is_as_new(tmp_path: Path) -> None:
    fake_libstdcxx(tmp_path / "libstdc++.so.6", "3.4.99")  # newer than any machine's
    assert prefer_newer_cxx_runtime(tmp_path) is None


def test_the_machines_is_loaded_when_newer(tmp_path: Path) -> None:
    fake_libstdcxx(tmp_path / "libstdc++.so.6", "3.4.21")  # GCC 5's: older than this machine's
    loaded = prefer_newer_cxx_runtime(tmp_path)
    assert loaded is not None and loaded.name == "libstdc++.so.6" and cxx_abi_level(loaded) > (3, 4, 21)


def test_nothing_is_carried_nothing_is_loaded(tmp_path: Path) -> None:
    assert prefer_newer_cxx_runtime(tmp_path) is None

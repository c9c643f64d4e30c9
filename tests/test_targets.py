"""Targets: the sidecar layout, the licence, `llamabox repack`, --platform / --stub-dir and `llamabox stubs`.

The sidecar and repacked bundles are run for real (the real Linux stub, SmolLM2) and must answer a
greedy prompt exactly as the ordinary bundle does. Stubs for platforms that cannot be built here are
stand-ins: a PyInstaller archive (written with PyInstaller's own CArchiveWriter) holding nothing but
a stub description, which is all the bundler reads of a stub.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PyInstaller.archive.writers import CArchiveWriter

from bundler import targets
from runtime import bundle_format
from runtime.errors import LlamaboxError
from runtime.platform_tag import STUB_INFO_NAME
from tests.conftest import ROOT, damaged_copy, llamabox
from tests.split_gguf import split_gguf
from tests.test_bundler_cli import assert_user_error, no_leftovers
from tests.test_hub_sources import only, sparse_gguf, wait_until, writing_unnamed_file
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"
GREEDY = ("--temp", "0", "-n", "24")


def run_prompt(executable: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_answer(bundle: Path) -> str:
    result = run_prompt(bundle, "-p", PROMPT, *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    return result.stdout


@pytest.fixture(scope="module")
def sidecar_bundle(tmp_path_factory: pytest.TempPathFactory, smollm2: Path, stub: Path) -> Path:
    out = tmp_path_factory.mktemp("sidecar") / "smol.run"
    result = llamabox("build", smollm2, "-o", out, "--stub", stub, "--sidecar")
    assert result.returncode == 0, result.stderr
    assert "smol.gguf" in result.stdout
    return out


def fake_stub(path: Path, **description: object) -> Path:
    """A stand-in stub: a PyInstaller archive whose only member is the stub description."""
    info = {"platform": "windows-x86_64", "runtime_version": "0.1.0", "llama_cpp_python": "0.3.36",
            "bundle_format": bundle_format.FORMAT_VERSION, **description}
    source = path.with_name(path.name + ".json")
    source.write_text(json.dumps(info))
    CArchiveWriter(str(path), [(STUB_INFO_NAME, str(source), False, "x")], "python311.dll")
    source.unlink()
    return path


# --- the sidecar layout ---


def test_sidecar_layout(sidecar_bundle: Path, smollm2: Path, stub: Path) -> None:
    sidecar = sidecar_bundle.with_name("smol.gguf")
    assert sidecar.read_bytes() == smollm2.read_bytes()
    opened = bundle_format.open_bundle(sidecar_bundle)
    m, t = opened.manifest, opened.trailer
    assert m.sidecar == bundle_format.Sidecar("smol.gguf", smollm2.stat().st_size, m.model.sha256)
    assert t.flags & bundle_format.FLAG_SIDECAR and t.format_version == m.format_version == bundle_format.LAUNCHER_FORMAT_VERSION
    assert opened.model_path == sidecar and (t.model_offset, t.model_size) == (0, smollm2.stat().st_size)
    # The executable holds no weights, nor an archive copy: the stub, the manifest and the trailer.
    assert sidecar_bundle.stat().st_size < stub.stat().st_size + 64 * 1024
    assert sidecar_bundle.read_bytes()[: stub.stat().st_size] == stub.read_bytes()


def test_sidecar_answers_like_a_bundle(sidecar_bundle: Path, reference_answer: str) -> None:
    result = run_prompt(sidecar_bundle, "-p", PROMPT, *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_answer


def test_sidecar_verify_and_inspect(sidecar_bundle: Path) -> None:
    result = llamabox("verify", sidecar_bundle)
    assert result.returncode == 0, result.stderr
    assert "in smol.gguf" in result.stdout
    result = llamabox("inspect", sidecar_bundle)
    assert result.returncode == 0, result.stderr
    assert "in the sidecar smol.gguf" in result.stdout and "format 4" in result.stdout
    assert json.loads(llamabox("inspect", "--json", sidecar_bundle).stdout)["sidecar"]["name"] == "smol.gguf"


def test_sidecar_missing_or_wrong_size(sidecar_bundle: Path, tmp_path: Path) -> None:
    alone = tmp_path / "smol.run"
    shutil.copy(sidecar_bundle, alone)
    for result in (run_prompt(alone, "-p", "hi"), llamabox("verify", alone), llamabox("inspect", alone)):
        assert_user_error(result, "smol.gguf beside it")
    (tmp_path / "smol.gguf").write_bytes(sidecar_bundle.with_name("smol.gguf").read_bytes()[:100_000])
    for result in (run_prompt(alone, "-p", "hi"), llamabox("verify", alone)):
        assert_user_error(result, "smol.gguf is 100,000 bytes but smol.run expects")


def test_sidecar_damaged_weights_fail_verify(sidecar_bundle: Path, tmp_path: Path) -> None:
    exe, sidecar = tmp_path / "smol.run", tmp_path / "smol.gguf"
    shutil.copy(sidecar_bundle, exe)
    shutil.copy(sidecar_bundle.with_name("smol.gguf"), sidecar)
    with open(sidecar, "r+b") as f:
        f.seek(sidecar.stat().st_size - 1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert_user_error(llamabox("verify", exe), "damaged")


def test_sidecar_refuses_existing_sidecar_and_gguf_output(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"mine")
    assert_user_error(llamabox("build", smollm2, "-o", tmp_path / "m.run", "--stub", stub, "--sidecar"), "already exists")
    assert (tmp_path / "m.gguf").read_bytes() == b"mine" and not (tmp_path / "m.run").exists()
    assert_user_error(llamabox("build", smollm2, "-o", tmp_path / "x.gguf", "--stub", stub, "--sidecar"), "ends with .gguf")
    no_leftovers(tmp_path)


def test_sidecar_names() -> None:
    assert targets.sidecar_path(Path("d/model.run")) == Path("d/model.gguf")
    assert targets.sidecar_path(Path("model.exe")) == Path("model.gguf")
    assert targets.sidecar_path(Path("qwen2.5")) == Path("qwen2.5.gguf")


def test_output_names() -> None:
    assert targets.output_name(Path("m"), "windows-x86_64") == Path("m.exe")
    assert targets.output_name(Path("m.run"), "windows-x86_64") == Path("m.exe")
    assert targets.output_name(Path("m.EXE"), "windows-x86_64") == Path("m.EXE")
    assert targets.output_name(Path("qwen2.5"), "windows-x86_64") == Path("qwen2.5.exe")
    assert targets.output_name(Path("m"), "macos-arm64") == Path("m")


def test_windows_size_limit() -> None:
    five_gb = 5 * 10**9
    with pytest.raises(LlamaboxError, match="Windows will not start.*--sidecar"):
        targets.check_windows_size("windows-x86_64", 60 << 20, five_gb, sidecar=False)
    with pytest.raises(LlamaboxError, match="--sidecar"):  # just under 4 GiB of model, plus the stub
        targets.check_windows_size("windows-x86_64", 60 << 20, (1 << 32) - (10 << 20), sidecar=False)
    targets.check_windows_size("windows-x86_64", 60 << 20, five_gb, sidecar=True)
    targets.check_windows_size("linux-x86_64", 60 << 20, five_gb, sidecar=False)
    targets.check_windows_size("windows-x86_64", 60 << 20, 3 * 10**9, sidecar=False)


# --- the licence ---


def test_license_from_gguf_and_file(tmp_path: Path, stub: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", license="mit")
    text = tmp_path / "LICENSE"
    text.write_text("MIT License\n\nCopyright (c) 2026 Somebody\n")
    out = tmp_path / "tiny.run"
    result = llamabox("build", model, "-o", out, "--stub", stub, "--license-file", text)
    assert result.returncode == 0, result.stderr
    assert "no licence" not in result.stderr
    assert bundle_format.open_bundle(out).manifest.license_text == text.read_text()
    shown = run_prompt(out, "--license")
    assert shown.returncode == 0, shown.stderr
    assert "Licence (GGUF general.license): mit" in shown.stdout
    assert "Copyright (c) 2026 Somebody" in shown.stdout
    assert "License file:" in llamabox("inspect", out).stdout


def test_build_warns_without_licence(tmp_path: Path, stub: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", license=None)
    out = tmp_path / "tiny.run"
    result = llamabox("build", model, "-o", out, "--stub", stub)
    assert result.returncode == 0, result.stderr
    assert "Warning: the model carries no licence information" in result.stderr
    shown = run_prompt(out, "--license")
    assert shown.returncode == 0 and "not stated" in shown.stdout and "carries no licence" in shown.stdout


def test_license_file_errors(tmp_path: Path, stub: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    bad = tmp_path / "LICENSE"
    bad.write_bytes(b"\xff\xfe\x00bad")
    assert_user_error(llamabox("build", model, "-o", tmp_path / "a.run", "--stub", stub, "--license-file", bad), "not UTF-8")
    assert_user_error(
        llamabox("build", model, "-o", tmp_path / "a.run", "--stub", stub, "--license-file", tmp_path / "nope"),
        "cannot read the licence file",
    )
    assert not (tmp_path / "a.run").exists()


# --- repack ---


def test_repack_with_new_args_answers_the_same(bundle: Path, tmp_path: Path, stub: Path, reference_answer: str) -> None:
    new = tmp_path / "new.run"
    result = llamabox("repack", bundle, "-o", new, "--stub", stub, "--args", " ".join(GREEDY))
    assert result.returncode == 0, result.stderr
    old_m, new_m = bundle_format.open_bundle(bundle).manifest, bundle_format.open_bundle(new).manifest
    assert new_m.default_args == list(GREEDY)
    assert (new_m.model, new_m.metadata, new_m.source, new_m.name) == (old_m.model, old_m.metadata, old_m.source, old_m.name)
    answer = run_prompt(new, "-p", PROMPT)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == reference_answer
    # Without --args the baked arguments stay; a sidecar bundle turns into one file with --inline.
    again = tmp_path / "again.run"
    assert llamabox("repack", new, "-o", again, "--stub", stub, "--sidecar").returncode == 0
    assert bundle_format.open_bundle(again).manifest.default_args == list(GREEDY)
    assert (tmp_path / "again.gguf").stat().st_size == new_m.model.size
    inline = tmp_path / "inline.run"
    result = llamabox("repack", again, "-o", inline, "--stub", stub, "--inline")
    assert result.returncode == 0, result.stderr
    opened = bundle_format.open_bundle(inline)
    assert opened.manifest.sidecar is None and opened.manifest.format_version == bundle_format.LAUNCHER_FORMAT_VERSION
    assert bundle_format.hash_model(opened) == old_m.model.sha256


def test_repack_refuses_damaged_model(bundle: Path, tmp_path: Path, stub: Path) -> None:
    damaged = damaged_copy(bundle, tmp_path, 5_000_000)
    out = tmp_path / "out.run"
    assert_user_error(llamabox("repack", damaged, "-o", out, "--stub", stub), "damaged")
    assert not out.exists()
    no_leftovers(tmp_path)


def test_repack_bad_input(bundle: Path, tmp_path: Path, stub: Path, smollm2: Path) -> None:
    assert_user_error(llamabox("repack", bundle, "-o", bundle, "--stub", stub, "--force"), "bundle being repacked")
    assert_user_error(llamabox("repack", smollm2, "-o", tmp_path / "a.run", "--stub", stub), "is a GGUF model")
    assert_user_error(llamabox("repack", bundle, "-o", tmp_path / "a.run", "--stub", stub, "--args", "--bogus"), "--args")
    assert_user_error(llamabox("repack", bundle, "-o", tmp_path / "a.run", "--stub", bundle), "already a llamabox bundle")
    assert list(tmp_path.iterdir()) == []


# --- platforms and stub directories ---


@pytest.fixture
def stub_dir(tmp_path: Path, stub: Path) -> Path:
    directory = tmp_path / "stubs"
    directory.mkdir()
    (directory / stub.name).symlink_to(stub)
    fake_stub(directory / "llamabox-runtime-windows-x86_64.exe", gpu_backends=["libggml-cuda.dll"])
    (directory / "llamabox-runtime-junk").write_bytes(b"not a stub at all")
    return directory


def test_platform_missing_lists_existing(stub_dir: Path, smollm2: Path, tmp_path: Path) -> None:
    result = llamabox("build", smollm2, "-o", tmp_path / "m", "--platform", "macos-arm64", "--stub-dir", stub_dir)
    assert_user_error(result, "no stub for macos-arm64")
    assert "linux-x86_64 (llamabox-runtime-linux-x86_64)" in result.stderr
    assert "windows-x86_64 (llamabox-runtime-windows-x86_64.exe)" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = llamabox("build", smollm2, "-o", tmp_path / "m", "--platform", "linux-arm64", "--stub-dir", empty)
    assert_user_error(result, "there are no stubs in")
    assert_user_error(llamabox("build", smollm2, "-o", tmp_path / "m", "--platform", "beos-m68k"), "beos-m68k")


def test_platform_windows_names_exe(stub_dir: Path, tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = llamabox("build", model, "-o", tmp_path / "tiny", "--platform", "windows-x86_64", "--stub-dir", stub_dir)
    assert result.returncode == 0, result.stderr
    exe = tmp_path / "tiny.exe"
    assert not (tmp_path / "tiny").exists()
    opened = bundle_format.open_bundle(exe)
    assert opened.manifest.platform == "windows-x86_64"
    assert "Run it on Windows with: tiny.exe" in result.stdout


def test_platform_linux_real_stub(stub_dir: Path, tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = llamabox("build", model, "-o", tmp_path / "t.run", "--platform", "linux-x86_64", "--stub-dir", stub_dir)
    assert result.returncode == 0, result.stderr
    assert bundle_format.open_bundle(tmp_path / "t.run").manifest.platform == "linux-x86_64"


def test_stub_for_another_platform_refused(tmp_path: Path, stub: Path) -> None:
    directory = tmp_path / "stubs"
    directory.mkdir()
    fake_stub(directory / "llamabox-runtime-windows-x86_64.exe", platform="macos-arm64")
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = llamabox("build", model, "-o", tmp_path / "t", "--platform", "windows-x86_64", "--stub-dir", directory)
    assert_user_error(result, "is a stub for macos-arm64, not windows-x86_64")
    result = llamabox("build", model, "-o", tmp_path / "t", "--platform", "macos-arm64", "--stub", stub)
    assert_user_error(result, "is a stub for linux-x86_64, not macos-arm64")
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.exe").exists()


def test_stub_for_another_format_refused(tmp_path: Path) -> None:
    directory = tmp_path / "stubs"
    directory.mkdir()
    fake_stub(directory / "llamabox-runtime-windows-x86_64.exe", bundle_format=99)
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = llamabox("build", model, "-o", tmp_path / "t", "--platform", "windows-x86_64", "--stub-dir", directory)
    assert_user_error(result, "bundle format 99")
    assert not (tmp_path / "t.exe").exists()


def test_stubs_listing(stub_dir: Path) -> None:
    result = llamabox("stubs", "--stub-dir", stub_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "llamabox-runtime-linux-x86_64\n  platform:        linux-x86_64" in out
    assert "needs glibc:     2." in out and "CPU (" in out and "haswell" in out
    assert "llamabox-runtime-windows-x86_64.exe\n  platform:        windows-x86_64" in out
    assert "CPU, CUDA" in out
    assert "llamabox-runtime-junk: not usable: llamabox-runtime-junk is not a llamabox runtime stub" in out
    empty = stub_dir / "none"
    empty.mkdir()
    assert "No stubs in" in llamabox("stubs", "--stub-dir", empty).stdout


# --- the Windows loader's C runtime ---


def test_windows_crt_follows_llama_dll_imports() -> None:
    from runtime.engine.loader import windows_crt_name

    msvc = b"MZ\x90\x00...KERNEL32.dll\x00api-ms-win-crt-stdio-l1-1-0.dll\x00VCRUNTIME140.dll\x00"
    mingw = b"MZ\x90\x00...KERNEL32.dll\x00msvcrt.dll\x00libgcc_s_seh-1.dll\x00"
    assert windows_crt_name(msvc) == "ucrtbase"
    assert windows_crt_name(mingw) == "msvcrt"
    assert windows_crt_name(b"MZ...UCRTBASE.DLL\x00") == "ucrtbase"


@pytest.mark.skipif(sys.platform != "linux", reason="O_TMPFILE and /proc are Linux's")
def test_sigterm_during_sidecar_build_leaves_neither_file(stub: Path, tmp_path: Path) -> None:
    model = sparse_gguf(tmp_path / "big.gguf", 1_500_000_000)
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", "from bundler.cli import main; main()", "build", model, "-o", out / "big.run", "--stub", stub,
         "--sidecar"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: writing_unnamed_file(process.pid, out), process, "the output was being written")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    only(out)


def test_repack_for_another_platform(bundle: Path, stub_dir: Path, tmp_path: Path) -> None:
    result = llamabox("repack", bundle, "-o", tmp_path / "m", "--platform", "windows-x86_64", "--stub-dir", stub_dir)
    assert result.returncode == 0, result.stderr
    opened = bundle_format.open_bundle(tmp_path / "m.exe")
    assert opened.manifest.platform == "windows-x86_64"
    assert bundle_format.hash_model(opened) == bundle_format.open_bundle(bundle).manifest.model.sha256
    result = llamabox("repack", bundle, "-o", tmp_path / "n", "--platform", "macos-arm64", "--stub-dir", stub_dir)
    assert_user_error(result, "no stub for macos-arm64")


def test_split_model_into_a_sidecar(smollm2: Path, stub: Path, tmp_path: Path, reference_answer: str) -> None:
    (tmp_path / "parts").mkdir()
    parts = split_gguf(smollm2, tmp_path / "parts", 3, stem="smol")
    out = tmp_path / "split.run"
    result = llamabox("build", parts[0], "-o", out, "--stub", stub, "--sidecar")
    assert result.returncode == 0, result.stderr
    manifest = bundle_format.open_bundle(out).manifest
    assert manifest.sidecar is not None and len(manifest.source.files) == 3
    assert (tmp_path / "split.gguf").stat().st_size == manifest.sidecar.size
    answer = run_prompt(out, "-p", PROMPT, *GREEDY)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == reference_answer

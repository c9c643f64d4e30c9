"""The Windows stub, built on Linux (scripts/build_windows.sh) and run under Wine: the .exe bundle answers as the
Linux one does, serves the APIs, loads every CPU variant, and carries every DLL it needs.

Wine is not Windows: what only real Windows shows is listed in the README (section "Windows").
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import wine
from tests.conftest import ROOT, build_exe, free_port, llamabox

PLATFORM = "windows-x86_64"
PROMPT = "Name three colours."

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or wine.why_not_ready() is not None, reason=f"Windows stub: {wine.why_not_ready()}"
)


def info(exe: Path, *args: str, **env: str) -> str:
    result = wine.run(exe, "--info", *args, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def chosen_variant(text: str) -> str:
    match = re.search(r"^CPU kernels loaded: (\S+) \(", text, re.M)
    assert match, text
    return match.group(1)


def test_the_exe_bundle_answers_as_the_linux_bundle_does_on_the_same_kernels(windows_bundle: Path, bundle: Path) -> None:
    variant = chosen_variant(info(windows_bundle))
    args = ("-p", PROMPT, "--temp", "0", "-n", "24", "--cpu-variant", variant)
    on_windows = wine.run(windows_bundle, *args)
    assert on_windows.returncode == 0, on_windows.stderr
    on_linux = subprocess.run([str(bundle), *args], capture_output=True, text=True, timeout=300)
    assert on_linux.returncode == 0, on_linux.stderr
    assert on_windows.stdout.strip() and on_windows.stdout.replace("\r\n", "\n") == on_linux.stdout


def answer(exe: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = wine.run(exe, "-p", PROMPT, "--temp", "0", "-n", "8", **env)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return result


def runtime_folder(exe: Path, cache: Path) -> Path:
    from runtime import bundle_format

    with open(exe, "rb") as f:
        header = bundle_format.read_stub_header(f)
    assert header is not None
    return cache / "runtime" / header.runtime_id


def test_the_runtime_is_unpacked_once_and_shared_by_every_bundle_of_its_build(windows_bundle: Path, tmp_path: Path, smollm2: Path, windows_stub: Path) -> None:
    cache = tmp_path / "cache"
    first = answer(windows_bundle, LLAMABOX_CACHE=wine.windows_path(cache))
    assert "preparing the runtime for its first start: unpacking" in first.stderr
    folder = runtime_folder(windows_bundle, cache)
    assert (folder / ".llamabox-complete").exists() and [p.name for p in (cache / "runtime").iterdir()] == [folder.name]
    again = answer(windows_bundle, LLAMABOX_CACHE=wine.windows_path(cache))
    assert again.stdout == first.stdout and "unpacking" not in again.stderr
    other = build_exe(smollm2, windows_stub, tmp_path / "other.exe", "--sidecar")
    assert "unpacking" not in answer(other, LLAMABOX_CACHE=wine.windows_path(cache)).stderr
    assert "Runtime: unpacked once in " in info(windows_bundle, LLAMABOX_CACHE=wine.windows_path(cache))


def test_a_start_interrupted_while_unpacking_or_a_damaged_runtime_is_unpacked_again(windows_bundle: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = runtime_folder(windows_bundle, cache)
    # A folder in the runtime's place that was never marked whole (a copy cut short, an unpacking killed).
    folder.mkdir(parents=True)
    (folder / "half.dll").write_bytes(b"MZ")
    first = answer(windows_bundle, LLAMABOX_CACHE=wine.windows_path(cache))
    assert "preparing the runtime" in first.stderr and not (folder / "half.dll").exists()
    # A file of the unpacked runtime cut short afterwards: the runtime finds it, the launcher unpacks again.
    library = folder / "_internal" / "ggml-backends" / "ggml-cpu-x64.dll"
    size = library.stat().st_size
    with open(library, "r+b") as f:
        f.truncate(size // 2)
    second = answer(windows_bundle, LLAMABOX_CACHE=wine.windows_path(cache))
    assert f"_internal/ggml-backends/ggml-cpu-x64.dll is {size // 2:,} bytes instead of {size:,}); unpacking it again" in second.stderr
    assert second.stdout == first.stdout and library.stat().st_size == size
    assert [p.name for p in (cache / "runtime").iterdir()] == [folder.name]  # the damaged copy was removed


@pytest.mark.parametrize("fraction", [1 / 3, 1 / 2, None], ids=["a third in", "half way", "gzip checksum"])
def test_a_damaged_runtime_payload_is_refused_and_never_cached(windows_bundle: Path, tmp_path: Path, fraction: float | None) -> None:
    """One byte flipped inside the packed runtime: the launcher reads the whole gzip stream, checksum included,
    also after a write failed (garbled data can name a file Windows refuses: CI once hit that)."""
    from runtime import bundle_format

    damaged = tmp_path / "damaged.exe"
    shutil.copy(windows_bundle, damaged)
    with open(damaged, "r+b") as f:
        header = bundle_format.read_stub_header(f)
        assert header is not None
        f.seek(header.payload_offset + (int(header.payload_size * fraction) if fraction else header.payload_size - 8))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x20]))
    cache = tmp_path / "cache"
    result = wine.run(damaged, "-p", PROMPT, "-n", "4", LLAMABOX_CACHE=wine.windows_path(cache))
    # Which line depends on where the flipped bit lands (bad deflate data, a garbled tar header, the checksum):
    # each ends the same way, and none is taken for a cache that cannot be written.
    assert result.returncode == 1 and not result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llamabox: ") and last.endswith("copy or download it again"), result.stderr
    assert "temporary folder" not in result.stderr
    assert not (cache / "runtime" / header.runtime_id).exists()


def test_a_cache_that_cannot_be_written_gives_a_temporary_runtime_for_the_run(windows_bundle: Path, tmp_path: Path, chattr_readonly) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    chattr_readonly(cache)
    drive = Path(wine.environment()["WINEPREFIX"]) / "drive_c"
    before = set(drive.rglob("llamabox-*"))
    result = answer(windows_bundle, LLAMABOX_CACHE=wine.windows_path(cache))
    assert "using a temporary folder for this run" in result.stderr
    assert not list(cache.iterdir())
    assert set(drive.rglob("llamabox-*")) == before, "the temporary runtime was left behind"


def test_info_names_the_windows_kernels_and_their_proof(windows_bundle: Path, tmp_path: Path) -> None:
    text = info(windows_bundle, LLAMABOX_CACHE=wine.windows_path(tmp_path))
    variant = chosen_variant(text)
    assert f"CPU kernels loaded: {variant} (ggml-cpu-{variant}.dll, llama.cpp score " in text
    # Proven, or chosen after passing over better ones (under Wine the AMX kernels may die: Windows code does not ask
    # Linux for the AMX state, so the self-test passes them over).
    proof = next(line for line in text.splitlines() if line.startswith("CPU kernels self-test: "))
    assert proof.endswith((f"{variant}: proven on this CPU", f"using {variant}", "the self-test's reference")), proof
    assert '"platform": "windows-x86_64"' in text
    assert (tmp_path / "kernel-proofs.json").exists()  # the verdict is cached, as on Linux


def test_the_self_test_passes_over_kernels_that_crash_or_answer_wrong_in_its_spawned_child(windows_bundle: Path, tmp_path: Path) -> None:
    """No fork() on Windows: the self-test spawns its child. A crash there (an illegal instruction raised as the
    CPU would raise it) and wrong logits are told apart and passed over, as on Linux."""
    runnable = re.search(r"runnable here: ([^)]*)\)", info(windows_bundle)).group(1).split(", ")
    if len(runnable) < 4:
        pytest.skip("needs a CPU that runs at least four CPU variants")
    best, second, third = runnable[-1], runnable[-2], runnable[-3]
    text = info(windows_bundle, LLAMABOX_CACHE=wine.windows_path(tmp_path), LLAMABOX_TEST_SELFTEST_FAULT=f"{best}=SIGILL,{second}=wrong")
    line = next(line for line in text.splitlines() if line.startswith("CPU kernels self-test:"))
    assert f"{best} died with SIGILL (EXCEPTION_ILLEGAL_INSTRUCTION)" in line and f"{second} gave wrong results" in line, line
    assert chosen_variant(text) == third


def test_every_cpu_variant_dll_loads_and_gives_the_score_the_linux_library_gives() -> None:
    """Each ggml-cpu-*.dll the stub carries (the toolchain's, which build.py packs) opens under Wine and scores
    this CPU as the Linux build of the same variant does."""
    from runtime.devices.cpu import variant_scores

    script = (
        "import json, pathlib, llama_cpp\n"  # llama_cpp first: it puts ggml-base.dll where the variants find it
        "from runtime.devices.cpu import variant_scores\n"
        "scores, warnings = variant_scores(pathlib.Path(llama_cpp.__file__).parent.parent / 'bin')\n"
        "print(json.dumps({'scores': {s.name: s.score for s in scores}, 'warnings': warnings}))\n"
    )
    result = wine.run(wine.windows_python(), "-c", script, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["warnings"] == []
    linux = {s.name: s.score for s in variant_scores()[0]}
    # sapphirerapids builds for Windows too (scripts/patches/windows/); every variant is there and scores alike.
    assert report["scores"] == linux


@pytest.mark.parametrize(("fault", "code", "what"), [("SIGILL", 0xC000001D, "an illegal instruction (EXCEPTION_ILLEGAL_INSTRUCTION)"),
                                                    ("SIGSEGV", 0xC0000005, "a bad memory access (EXCEPTION_ACCESS_VIOLATION)")])
def test_a_crash_in_a_native_thread_ends_the_process_with_one_line(windows_bundle: Path, fault: str, code: int, what: str) -> None:
    """No watcher process on Windows: the model's process reports its own fault (an unhandled-exception filter),
    here raised by a native thread as a llama.cpp kernel would (LLAMABOX_TEST_CRASH), and ends with the code."""
    result = wine.run(windows_bundle, "-p", PROMPT, "-n", "4", LLAMABOX_TEST_CRASH=fault)
    assert result.returncode == code & 0xFF  # Wine passes the low byte of the exit code on to Linux
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"llamabox: the model's process died of {what} in the ") and "--cpu-variant x64" in lines[-1]
    assert "Traceback" not in result.stderr and "Unhandled" not in result.stderr and not result.stdout.strip()


@pytest.fixture(scope="module")
def windows_server(windows_bundle: Path) -> Iterator[str]:
    port = free_port()
    process = wine.start(windows_bundle, "--nobrowser", "--temp", "0", "--ctx-per-slot", "--port", str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(url + "health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError("the Windows server never became healthy")
        yield url
    finally:
        # The onefile .exe runs the runtime in a child process that Wine keeps when its parent is killed.
        subprocess.run(["wineserver", "-k"], env=wine.environment())
        process.wait(timeout=30)


def test_the_windows_server_answers_health_openai_streaming_and_ollama(windows_server: str) -> None:
    import ollama
    import openai

    health = httpx.get(windows_server + "health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    client = openai.OpenAI(base_url=windows_server + "v1", api_key="none")
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0, stream=True
    )
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(chunks) > 2 and "".join(chunks).strip()

    reply = ollama.Client(host=windows_server.rstrip("/")).chat(
        model="smollm2", messages=[{"role": "user", "content": PROMPT}], options={"temperature": 0, "num_predict": 16}
    )
    assert reply.message.content.strip() and reply.done


def test_without_vulkan_the_exe_says_so_and_runs_on_the_cpu(windows_bundle: Path, tmp_path: Path) -> None:
    """A Windows machine whose driver has no Vulkan (no vulkan-1.dll; Wine's is switched off here)."""
    text = info(windows_bundle, LLAMABOX_CACHE=wine.windows_path(tmp_path), WINEDLLOVERRIDES="mscoree,mshtml,vulkan-1=")
    assert "GPU: vulkan: not usable here (vulkan-1.dll not found); it needs a GPU driver with Vulkan (vulkan-1.dll)" in text, text
    assert "GPU: no usable GPU: running on the CPU" in text


def console_text(raw: str) -> str:
    """What a Windows console program wrote to a terminal under Wine, as a person reads it: Wine's console draws
    with cursor codes, moving right (ESC [ n C) where a space was written."""
    text = re.sub(r"\x1b\[(\d+)C", lambda m: " " * int(m.group(1)), raw)
    return re.sub(r"\x1b\[[?\d;]*[A-Za-z]", "", text).replace("\r", "")


def test_ctrl_c_in_the_console_stops_the_server(windows_bundle: Path, tmp_path: Path) -> None:
    """Ctrl+C typed in the console stops the server cleanly. Under Wine the console is a terminal (its ^C becomes
    CTRL_C_EVENT for every process attached): the launcher lets the runtime answer it, waits, and exits with it."""
    pexpect = pytest.importorskip("pexpect")
    port = free_port()
    console = pexpect.spawn(
        "wine", [str(windows_bundle), "--nobrowser", "--port", str(port)],
        env=wine.environment(LLAMABOX_CACHE=wine.windows_path(tmp_path)), encoding="utf-8", codec_errors="replace", timeout=180,
    )
    try:
        deadline = time.monotonic() + 180
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            assert console.isalive() and time.monotonic() < deadline, console_text(console.before or "")
            with contextlib.suppress(pexpect.TIMEOUT):
                console.expect(pexpect.EOF, timeout=0.5)
        console.sendintr()
        console.expect(pexpect.EOF, timeout=60)
    finally:
        console.close(force=True)
        subprocess.run(["wineserver", "-k"], env=wine.environment())
    said = console_text(console.before or "")
    assert "press Ctrl+C to stop" in said and said.rstrip().endswith("llamabox: stopped"), said
    assert "Traceback" not in said and console.exitstatus == 0, said
    assert not _healthy(f"http://127.0.0.1:{port}/health")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_sidecar_bundle_answers(tmp_path: Path, smollm2: Path, windows_stub: Path) -> None:
    exe = build_exe(smollm2, windows_stub, tmp_path / "side car.exe", "--sidecar")
    assert (tmp_path / "side car.gguf").exists() and exe.stat().st_size < smollm2.stat().st_size
    result = wine.run(exe, "-p", PROMPT, "--temp", "0", "-n", "8")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_a_bundle_on_a_read_only_share_answers(windows_bundle: Path, tmp_path: Path, chattr_readonly) -> None:
    share = tmp_path / "share"
    share.mkdir()
    exe = share / "smollm2.exe"
    shutil.copy(windows_bundle, exe)
    chattr_readonly(share)
    result = wine.run(exe, "-p", PROMPT, "--temp", "0", "-n", "8")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_a_bundle_signed_with_osslsigncode_verifies_and_still_answers(windows_bundle: Path, tmp_path: Path) -> None:
    """Signing as the README shows (a self-made certificate here; a real one is bought from a CA): the signature
    follows the bundle's trailer, and both Authenticode and the bundle still read."""
    if shutil.which("osslsigncode") is None or shutil.which("openssl") is None:
        pytest.skip("needs osslsigncode and openssl")
    key, cert, signed = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "signed.exe"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key, "-out", cert,
         "-subj", "/CN=llamabox test signer", "-addext", "extendedKeyUsage=codeSigning"],
        check=True, capture_output=True,
    )
    subprocess.run(
        ["osslsigncode", "sign", "-certs", cert, "-key", key, "-n", "SmolLM2", "-in", windows_bundle, "-out", signed],
        check=True, capture_output=True,
    )
    assert signed.stat().st_size > windows_bundle.stat().st_size
    verified = subprocess.run(["osslsigncode", "verify", "-CAfile", cert, "-ignore-crl", "-in", signed], capture_output=True, text=True)
    assert verified.returncode == 0 and "Succeeded" in verified.stdout, verified.stdout + verified.stderr
    inspected = llamabox("inspect", signed)
    assert inspected.returncode == 0 and "SmolLM2" in inspected.stdout, inspected.stderr
    args = ("-p", PROMPT, "--temp", "0", "-n", "8")
    answer, unsigned = wine.run(signed, *args), wine.run(windows_bundle, *args)
    assert answer.returncode == 0 and answer.stdout.strip() and answer.stdout == unsigned.stdout, answer.stderr


def test_the_exe_imports_only_windows_system_dlls_and_what_it_carries(windows_stub: Path) -> None:
    """Every PE file in the stub (the launcher, the runtime's bootloader, Python, the extension modules, llama.cpp's
    DLLs) imports only DLLs that every Windows has or that the stub carries."""
    pefile = pytest.importorskip("pefile")
    from runtime import bundle_format

    with open(windows_stub, "rb") as f:
        header = bundle_format.read_stub_header(f)
        assert header is not None, "not a launcher-layout stub"
        f.seek(0)
        files = {"(launcher)": f.read(header.payload_offset)}
        f.seek(header.payload_offset)
        with tarfile.open(fileobj=io.BytesIO(f.read(header.payload_size)), mode="r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith((".dll", ".pyd", ".exe")):
                    files[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    carried = {Path(name).name.lower() for name in files}
    missing: dict[str, set[str]] = {}
    for name, data in files.items():
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_IMPORT"]])
        for entry in getattr(pe, "DIRECTORY_ENTRY_IMPORT", []):
            dll = entry.dll.decode().lower()
            if dll not in carried and not is_windows_system_dll(dll):
                missing.setdefault(name, set()).add(dll)
    # The Vulkan loader comes with the machine's GPU driver: only the Vulkan backend imports it, and the runtime
    # names it in one line where it is missing (test_without_vulkan_the_exe_says_so_and_runs_on_the_cpu).
    vulkan = [name for name in missing if Path(name).name.lower() == "ggml-vulkan.dll"]
    assert len(vulkan) == 1 and missing.pop(vulkan[0]) == {"vulkan-1.dll"}, missing
    assert not missing, f"DLLs that neither Windows nor the stub has: {missing}"
    assert {"libllama.dll", "ggml-base.dll", "libstdc++-6.dll", "libwinpthread-1.dll", "ggml-cpu-x64.dll", "ggml-vulkan.dll"} <= carried


# What every Windows 10 and 11 has in System32 (the API sets, the universal C runtime, the Win32 core), and
# msvcrt.dll, which MinGW-built DLLs use as their C runtime.
SYSTEM_DLLS = {
    "kernel32.dll", "user32.dll", "advapi32.dll", "shell32.dll", "ole32.dll", "oleaut32.dll", "ws2_32.dll",
    "msvcrt.dll", "ucrtbase.dll", "ntdll.dll", "gdi32.dll", "comctl32.dll", "comdlg32.dll", "crypt32.dll",
    "bcrypt.dll", "secur32.dll", "shlwapi.dll", "version.dll", "winmm.dll", "iphlpapi.dll", "rpcrt4.dll",
    "setupapi.dll", "cfgmgr32.dll", "userenv.dll", "psapi.dll", "dbghelp.dll", "imm32.dll", "mswsock.dll",
    "netapi32.dll", "powrprof.dll", "shcore.dll", "uxtheme.dll", "wtsapi32.dll", "dwmapi.dll", "winhttp.dll",
    "wininet.dll", "cabinet.dll", "msi.dll", "ncrypt.dll", "normaliz.dll", "urlmon.dll", "wintrust.dll",
}


def is_windows_system_dll(name: str) -> bool:
    return name in SYSTEM_DLLS or name.startswith(("api-ms-win-", "ext-ms-win-"))

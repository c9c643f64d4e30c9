"""Shared fixtures: the real SmolLM2 model, the real runtime stub (built once per session), a bundle."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bundler.default_model import default_model_path
from runtime.platform_tag import current_platform, stub_file_name

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DATE_EPOCH = "1767225600"  # 2026-01-01T00:00:00Z


def llamabox(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the llamabox CLI as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-c", "from bundler.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=600,
    )


def damaged_copy(bundle: Path, directory: Path, weight_offset: int) -> Path:
    """A copy of `bundle` with one bit of the embedded weights flipped, `weight_offset` bytes in."""
    from runtime import bundle_format

    damaged = directory / "damaged.run"
    shutil.copy(bundle, damaged)
    offset = bundle_format.open_bundle(damaged).model_offset + weight_offset
    with open(damaged, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    return damaged


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return default_model_path(quiet=True)


@pytest.fixture(scope="session")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime stub, built from this checkout once per test session ($LLAMABOX_TEST_STUB reuses one)."""
    if os.environ.get("LLAMABOX_TEST_STUB"):
        return Path(os.environ["LLAMABOX_TEST_STUB"])
    dist = tmp_path_factory.mktemp("stubs")
    subprocess.run([sys.executable, str(ROOT / "build.py"), "--dist", str(dist)], check=True, cwd=ROOT, timeout=1800)
    return dist / stub_file_name(current_platform())


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory, smollm2: Path, stub: Path) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "smollm2.run"
    result = llamabox("build", smollm2, "-o", out, "--stub", stub, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    assert result.returncode == 0, result.stderr
    return out


# The Windows stub and an .exe bundle (tests/test_windows*.py run them under Wine).


@pytest.fixture(scope="session")
def windows_stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Windows stub, built from this checkout once per test session ($LLAMABOX_TEST_WINDOWS_STUB reuses one)."""
    if os.environ.get("LLAMABOX_TEST_WINDOWS_STUB"):
        return Path(os.environ["LLAMABOX_TEST_WINDOWS_STUB"])
    dist = tmp_path_factory.mktemp("windows-stubs")
    subprocess.run([sys.executable, str(ROOT / "build.py"), "--platform", "windows-x86_64", "--dist", str(dist)], check=True, cwd=ROOT, timeout=1800)
    return dist / stub_file_name("windows-x86_64")


def build_exe(smollm2: Path, stub: Path, out: Path, *extra: str) -> Path:
    result = llamabox("build", smollm2, "-o", out, "--stub", stub, *extra, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def windows_bundle(tmp_path_factory: pytest.TempPathFactory, smollm2: Path, windows_stub: Path) -> Path:
    # A folder with a space and non-ASCII letters: Windows paths are opened as wide strings.
    folder = tmp_path_factory.mktemp("windows bundle") / "modèles ñ"
    folder.mkdir()
    return build_exe(smollm2, windows_stub, folder / "smollm2.exe")


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


def start_server(
    executable: Path, *args: str, timeout: float = 120, log: Path | None = None, env: dict[str, str] | None = None
) -> Server:
    """Start an executable in server mode and wait until /health answers.

    stderr is a pipe, or the file `log` (for --verbose, which writes more than a pipe holds unread).
    """
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as stderr:
        process = subprocess.Popen(
            [str(executable), "--nobrowser", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"(?:chat|server):\s+(https?://(?:\[[0-9a-f:]+\]|[\d.]+):(\d+)/)", line)
        if match:
            server = Server(process=process, url=match.group(1), port=int(match.group(2)))
            break
        if time.monotonic() > deadline:
            break
    else:
        process.kill()
        raise AssertionError(f"server did not start: {log.read_text()[-2000:] if log else process.stderr.read() if process.stderr else ''}")
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "health", timeout=2, verify=False).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_server(server)
    raise AssertionError("server never became healthy")


def free_port() -> int:
    """A port nobody listens on now (so that test runs side by side do not collide)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(bundle: Path) -> Iterator[Server]:
    # Each slot with a cache of its own (--ctx-per-slot, 4,096 tokens each): greedy answers are then the same for
    # the same request whatever else the server holds, which the API tests compare across requests and dialects.
    # In one shared cache (the default, tested in test_executable.py and test_engine.py) later tokens can differ.
    running = start_server(bundle, "--temp", "0", "--ctx-per-slot", "--port", str(free_port()))
    yield running
    stop_server(running)


@pytest.fixture
def chattr_readonly() -> Iterator[callable]:
    """Make a directory unwritable, even for root (chattr +i); undone after the test."""
    made: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                pytest.skip("cannot make a directory read-only for root here")
        else:
            path.chmod(0o555)
        made.append(path)

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)])
        else:
            path.chmod(0o755)

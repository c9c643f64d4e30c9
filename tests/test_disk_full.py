"""A full disk while `llamabox build` writes: a one-line error that says so and what to do, a non-zero exit, no
traceback, and nothing left behind (no output, no hidden partial file, no space still taken).

Small tmpfs mounts stand in for the full disk, so these tests need root (and a kernel that lets this machine
mount); they skip, saying why, where that is not possible. SmolLM2 is 98 MB and the stub about 40 MB: a 60 MB
disk holds the stub but not the model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bundler import atomic
from runtime import bundle_format
from runtime.errors import LlamaboxError
from tests.conftest import llamabox
from tests.fake_hub import FakeHub

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="mounts a Linux tmpfs")]

MiB = 1 << 20
REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
REAL = "SmolLM2-135M-Instruct-Q4_1.gguf"
# The bundle format module copies the stub with copy_file_range(), which Linux refuses between two file systems
# (EXDEV) since 5.19: until it falls back to copying through Python, no bundle can be written onto another disk.


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs of the given size (`60m`) in this test's directory; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one 'Error: ...' line of a failed command: exit code 1, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def empty(disk: Path) -> None:
    """Nothing on `disk`, hidden files included, and no space taken (no unnamed file still open either)."""
    assert sorted(os.listdir(disk)) == []
    assert shutil.disk_usage(disk).used == 0



# --- the bundle does not fit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sidecar", [False, True], ids=["one file", "sidecar"])
def test_bundle_on_a_full_disk(tmpfs, smollm2: Path, stub: Path, sidecar: bool) -> None:
    disk = tmpfs("60m")
    out = disk / "smol.run"
    result = llamabox("build", smollm2, "-o", out, "--stub", stub, *(["--sidecar"] if sidecar else []))
    line = error_line(result)
    filled = disk / "smol.gguf" if sidecar else out  # the file that did not fit is the one named
    assert line.startswith(f"Error: writing {filled} failed: the disk is full ("), line
    assert line.endswith(f"free in {disk}); nothing was written: free some space there, or write the output to "
                         "another disk with -o"), line
    empty(disk)


@pytest.mark.parametrize("sidecar", [False, True], ids=["one file", "sidecar"])
def test_bundle_fits_on_a_big_enough_disk(tmpfs, smollm2: Path, stub: Path, sidecar: bool) -> None:
    """The same build onto a disk with room: what fails above is the space, not the tmpfs."""
    disk = tmpfs("200m")
    result = llamabox("build", smollm2, "-o", disk / "smol.run", "--stub", stub, *(["--sidecar"] if sidecar else []))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(disk)) == (["smol.gguf", "smol.run"] if sidecar else ["smol.run"])
    assert llamabox("verify", disk / "smol.run").returncode == 0


# --- atomic_write on a full disk, in-process: with O_TMPFILE and with a hidden partial file ------------------


@pytest.fixture(params=["unnamed", "partial file"])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "partial file":  # as where the file system or OS has no O_TMPFILE
        monkeypatch.setattr(atomic, "_unnamed_file", lambda _directory: None)
    return request.param


def fill(f, size: int) -> None:
    for _ in range(size // MiB):
        f.write(b"\0" * MiB)


def test_atomic_write_on_a_full_disk(tmpfs, writer: str) -> None:
    disk = tmpfs("8m")
    with pytest.raises(LlamaboxError, match=r"^writing .*x\.bin failed: the disk is full \(8\.4 MB free in "), \
            atomic.atomic_write(disk / "x.bin") as f:
        fill(f, 9 * MiB)
    empty(disk)


def test_atomic_write_whose_last_bytes_do_not_fit(tmpfs, writer: str) -> None:
    """Every write fits but the last buffered bytes do not: the flush at the end fails, and is reported the same."""
    disk = tmpfs("8m")
    with pytest.raises(LlamaboxError, match="the disk is full"), atomic.atomic_write(disk / "x.bin") as f:
        fill(f, 8 * MiB)
        f.write(b"manifest")
    empty(disk)


def test_interrupt_on_a_full_disk_stays_an_interrupt(tmpfs, writer: str) -> None:
    """Ctrl+C with bytes still buffered on a full disk: closing the file cannot flush them, and that must not turn
    the interrupt into a disk error (or a traceback)."""
    disk = tmpfs("8m")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_write(disk / "x.bin") as f:
        fill(f, 8 * MiB)
        f.write(b"manifest")
        raise KeyboardInterrupt
    empty(disk)


# --- the Hugging Face cache on a full disk -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(smollm2: Path) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    fake.add_repo(REPO, {REAL: smollm2})
    yield fake
    fake.stop()


def hub_env(hub: FakeHub, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(cache / "home"), "HF_HUB_CACHE": str(cache / "hub")}


def test_download_that_cannot_fit_is_not_started(tmpfs, hub: FakeHub, stub: Path, tmp_path: Path) -> None:
    cache = tmpfs("60m")
    hub.clear_log()
    line = error_line(llamabox("build", f"{REPO}:Q4_1", "-o", tmp_path / "x.run", "--stub", stub,
                               **hub_env(hub, cache)))
    full = f"Error: the disk holding the Hugging Face cache {cache / 'hub'} is full"
    assert line.startswith(f"{full} (98.4 MB needed, "), line
    assert line.endswith(f"so {REAL} from {REPO} cannot be downloaded; free some space there, or set HF_HUB_CACHE "
                         "to a folder on a disk with room, and run the command again"), line
    assert hub.gets(REAL) == []
    assert not list(cache.rglob("*.incomplete")) and not (tmp_path / "x.run").exists()


def test_disk_filling_up_during_the_download(tmpfs, hub: FakeHub, stub: Path, smollm2: Path, tmp_path: Path) -> None:
    """Another program fills the cache's disk while the model downloads: the partial download is deleted (so the
    space is free again) and the error says what to do; the next build, with room, works."""
    cache = tmpfs("150m")
    env = hub_env(hub, cache)
    hub.throttle(REAL, 0.05)
    filler = cache / "filler"
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", "from bundler.cli import main; main()", "build", f"{REPO}:Q4_1", "-o",
             tmp_path / "x.run", "--stub", stub], cwd=Path(__file__).resolve().parent.parent, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 10 * MiB for p in cache.rglob("*.incomplete")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * MiB)
        _, stderr = process.communicate(timeout=120)
    finally:
        hub.throttle(REAL, None)
    line = error_line(subprocess.CompletedProcess([], process.returncode, "", stderr))
    full = f"the disk holding the Hugging Face cache {cache / 'hub'} is full"
    assert f"{full}, so {REAL} from {REPO} cannot be downloaded" in line, line
    assert not list(cache.rglob("*.incomplete")) and not (tmp_path / "x.run").exists()
    filler.unlink()
    result = llamabox("build", f"{REPO}:Q4_1", "-o", tmp_path / "x.run", "--stub", stub, **env)
    assert result.returncode == 0, result.stderr
    assert bundle_format.open_bundle(tmp_path / "x.run").manifest.model.sha256 == hub.etag(smollm2)

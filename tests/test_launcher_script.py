"""The launcher script and the runtime cache's housekeeping, fast: a stub made by build.py's own packing around a
stand-in runtime (a shell script), run under dash and bash in POSIX mode (macOS's /bin/sh)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import bundle_format, runtime_cache
from runtime.packaged import COMPLETE_MARKER, FILE_LIST_NAME

SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]
# What the stand-in runtime prints: whether its copy is temporary, the file the user ran, its arguments.
RUNTIME = '#!/bin/sh\nprintf "ran %s %s %s\\n" "$LLAMABOX_RUNTIME_TEMPORARY" "$LLAMABOX_BUNDLE" "$*"\n'


def make_stub(tmp_path: Path, libpython_mb: int = 1) -> tuple[Path, str]:
    """A launcher stub whose runtime is a shell script with a libpython of incompressible bytes; (stub, runtime id)."""
    import build

    folder = tmp_path / "build" / "rt"
    (folder / "_internal").mkdir(parents=True)
    (folder / "rt").write_text(RUNTIME)
    (folder / "rt").chmod(0o755)
    (folder / "_internal" / "libpython3.11.so.1.0").write_bytes(os.urandom(libpython_mb << 20))
    (folder / "_internal" / "base_library.zip").write_bytes(b"zip" * 100)
    (folder / "_internal" / "other.py").write_text("pass\n")
    stub = tmp_path / "stub dir" / "my stub.run"
    stub.parent.mkdir()
    build.write_launcher_stub(folder, stub, {"platform": "linux-x86_64"}, "linux-x86_64")
    with open(stub, "rb") as f:
        header = bundle_format.read_stub_header(f)
    assert header is not None
    return stub, header.runtime_id


def launch(shell: str, stub: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLAMABOX_")}
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    command = [shell] + (["--posix"] if shell == "bash" else []) + [str(stub), *args]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=60)


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small file system)")
    mounted: list[Path] = []

    def make(size: str) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_unpacks_once_publishes_a_link_and_passes_everything_on(tmp_path: Path, shell: str) -> None:
    stub, runtime_id = make_stub(tmp_path)
    cache = tmp_path / "cache"
    first = launch(shell, stub, "-p", "two words", LLAMABOX_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"ran 0 {stub} -p two words\n"
    assert "preparing the runtime for its first start: unpacking" in first.stderr
    link = cache / "runtime" / runtime_id
    assert link.is_symlink() and (link / COMPLETE_MARKER).exists()
    assert oct(link.resolve().stat().st_mode & 0o777) == "0o755"  # usable by the other users of a shared cache
    again = launch(shell, stub, "x", LLAMABOX_CACHE=str(cache))
    assert again.stdout == f"ran 0 {stub} x\n" and again.stderr == ""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_found_on_path_by_bash_run_as_sh(tmp_path: Path) -> None:
    """`sh NAME` with NAME on PATH and not here: bash (macOS's /bin/sh) finds it, and the launcher must too."""
    shell = "bash"
    stub, _ = make_stub(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "LLAMABOX_CACHE": str(tmp_path / "c")}
    command = [shell, *(["--posix"] if shell == "bash" else []), stub.name, "a"]
    result = subprocess.run(command, capture_output=True, text=True, env=environ, cwd=elsewhere, timeout=60)
    assert result.stdout == f"ran 0 {stub} a\n", result.stderr


def test_a_needed_file_gone_is_unpacked_again(tmp_path: Path, shell: str) -> None:
    stub, runtime_id = make_stub(tmp_path)
    cache = tmp_path / "cache"
    assert launch(shell, stub, LLAMABOX_CACHE=str(cache)).returncode == 0
    old = (cache / "runtime" / runtime_id).resolve()
    (old / "_internal" / "libpython3.11.so.1.0").unlink()
    result = launch(shell, stub, "b", LLAMABOX_CACHE=str(cache))
    assert result.stdout == f"ran 0 {stub} b\n", result.stderr
    assert (cache / "runtime" / runtime_id).resolve() != old  # a new copy, published in place of the damaged one


def test_a_full_disk_while_unpacking_publishes_nothing(tmp_path: Path, tmpfs: callable, shell: str) -> None:
    stub, runtime_id = make_stub(tmp_path, libpython_mb=3)
    disk = tmpfs("2m")
    result = launch(shell, stub, "c", LLAMABOX_CACHE=str(disk), TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "could not unpack the runtime into" in result.stderr and "is the disk full?" in result.stderr
    assert result.stdout == f"ran 1 {stub} c\n"  # from a temporary copy instead
    assert os.listdir(disk / "runtime") == []  # no link, no half-unpacked folder


def test_interrupted_first_unpacking_leaves_nothing(tmp_path: Path) -> None:
    stub, runtime_id = make_stub(tmp_path, libpython_mb=150)
    runtimes = tmp_path / "cache" / "runtime"
    environ = {**os.environ, "LLAMABOX_CACHE": str(runtimes.parent)}
    started = subprocess.Popen(["sh", str(stub)], env=environ, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not list(runtimes.glob(f"{runtime_id}.*/_internal")) and time.monotonic() < deadline:  # tar is writing
        time.sleep(0.005)
    os.killpg(started.pid, signal.SIGINT)  # what Ctrl+C sends: to the whole foreground group
    started.wait(timeout=30)
    assert started.returncode != 0, "the unpacking finished before it could be interrupted"
    assert [p.name for p in runtimes.iterdir()] == []


def test_cut_inside_the_runtime_is_explained(tmp_path: Path, shell: str) -> None:
    stub, _ = make_stub(tmp_path)
    cut = tmp_path / "cut.run"
    cut.write_bytes(stub.read_bytes()[:-1000])
    result = launch(shell, cut, LLAMABOX_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 1
    assert "cut.run is incomplete" in result.stderr and "copy or download it again" in result.stderr


# --- the runtime's housekeeping (runtime_cache) --------------------------------------------------------------


def runtime_folder(runtimes: Path, name: str, age: float, whole: bool = True) -> Path:
    folder = runtimes / name
    folder.mkdir(parents=True)
    (folder / FILE_LIST_NAME).write_text("{}")
    if whole:
        (folder / COMPLETE_MARKER).write_text("")
    os.utime(folder, (time.time() - age, time.time() - age))
    return folder


def test_sweep_removes_only_leftovers_that_nobody_runs_from(tmp_path: Path) -> None:
    runtimes = tmp_path / "runtime"
    linked = runtime_folder(runtimes, "0123456789abcdef.AAAAAA", 7200)
    (runtimes / "0123456789abcdef").symlink_to(linked.name)
    replaced = runtime_folder(runtimes, "0123456789abcdef.BBBBBB", 120)
    in_use = runtime_folder(runtimes, "0123456789abcdef.CCCCCC", 120)
    unpacking = runtime_folder(runtimes, "0123456789abcdef.DDDDDD", 10, whole=False)
    killed = runtime_folder(runtimes, "0123456789abcdef.EEEEEE", 7200, whole=False)
    not_ours = runtime_folder(runtimes, "my-project", 7200)
    holder = os.open(in_use / FILE_LIST_NAME, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)  # a runtime still running from the replaced copy
    try:
        runtime_cache.sweep(runtimes)
        left = sorted(p.name for p in runtimes.iterdir())
        assert left == sorted(["0123456789abcdef", linked.name, in_use.name, unpacking.name, not_ours.name])
        assert not replaced.exists() and not killed.exists()
    finally:
        os.close(holder)
    runtime_cache.sweep(runtimes)
    assert not in_use.exists() and not_ours.exists()


def test_discard_unlinks_only_a_link_that_names_the_damaged_folder(tmp_path: Path) -> None:
    runtimes = tmp_path / "runtime"
    damaged = runtime_folder(runtimes, "0123456789abcdef.AAAAAA", 0)
    fresh = runtime_folder(runtimes, "0123456789abcdef.BBBBBB", 0)
    link = runtimes / "0123456789abcdef"
    link.symlink_to(fresh.name)  # another start already published a fresh copy
    runtime_cache.discard(link, damaged)
    assert not damaged.exists() and link.resolve() == fresh.resolve()
    link.unlink()
    link.symlink_to(fresh.name)
    runtime_cache.discard(link, fresh)
    assert not link.is_symlink() and not fresh.exists()


def test_runtime_builds_unused_for_a_month_are_removed(tmp_path: Path) -> None:
    runtimes = tmp_path / "runtime"
    month = 31 * 24 * 3600

    def build(runtime_id: str, last_started: float) -> Path:
        folder = runtime_folder(runtimes, f"{runtime_id}.AAAAAA", month + 3600)
        link = runtimes / runtime_id
        link.symlink_to(folder.name)
        os.utime(link, (time.time() - last_started, time.time() - last_started), follow_symlinks=False)
        return folder

    old = build("1111111111111111", month)
    recent = build("2222222222222222", 3600)
    old_but_running = build("3333333333333333", month)
    holder = os.open(old_but_running / FILE_LIST_NAME, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    try:
        runtime_cache.sweep(runtimes)
    finally:
        os.close(holder)
    assert not old.exists() and not (runtimes / "1111111111111111").is_symlink()
    assert recent.exists() and old_but_running.exists() and (runtimes / "3333333333333333").is_symlink()

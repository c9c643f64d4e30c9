"""The launcher layout, run as users run it: the runtime unpacked once into the cache, shared by concurrent
first starts, checked before use and unpacked again when damaged, a temporary copy where the cache cannot be
used (read-only, noexec, no HOME), odd paths, a read-only bundle, no network, and downloads cut short."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import bundle_format

pytestmark = pytest.mark.slow

PROMPT = ("-p", "Name three colors.", "--temp", "0", "-n", "12")
PREPARING = "preparing the runtime for its first start"


def env_with(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMABOX_")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(command: list[str | Path], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def answered(result: subprocess.CompletedProcess[str], reference: str) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == reference


@pytest.fixture(scope="module")
def reference(bundle: Path) -> str:
    """The bundle's answer, from the usual cache."""
    result = run([bundle, *PROMPT], env_with())
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def runtime_id(bundle: Path) -> str:
    with open(bundle, "rb") as f:
        header = bundle_format.read_stub_header(f)
    assert header is not None, "the bundle is not of the launcher layout"
    return header.runtime_id


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small file system)")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[callable]:
    """mount(options) -> a fresh tmpfs directory mounted with those options, unmounted afterwards."""
    needs_root()
    mounted: list[Path] = []

    def make(options: str, name: str = "mnt") -> Path:
        target = tmp_path / name
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},size=400m", "tmpfs", str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_first_start_unpacks_once_then_every_start_reuses_it(bundle: Path, tmp_path: Path, reference: str, runtime_id: str) -> None:
    cache = tmp_path / "cache"
    env = env_with(LLAMABOX_CACHE=str(cache))
    first = run([bundle, *PROMPT], env)
    answered(first, reference)
    assert PREPARING in first.stderr and str(cache / "runtime" / runtime_id) in first.stderr
    link = cache / "runtime" / runtime_id
    assert link.is_symlink() and (link / ".llamabox-complete").exists()
    again = run([bundle, *PROMPT], env)
    answered(again, reference)
    assert PREPARING not in again.stderr
    info = run([bundle, "--info"], env)
    assert info.returncode == 0, info.stderr
    assert f"Runtime: unpacked once in {link.resolve()}" in info.stdout and f"remove {cache / 'runtime'}" in info.stdout


def test_simultaneous_first_starts_all_succeed_and_share_one_copy(bundle: Path, tmp_path: Path, runtime_id: str) -> None:
    cache = tmp_path / "cache"
    env = env_with(LLAMABOX_CACHE=str(cache))
    starts = [subprocess.Popen([str(bundle), "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    for start in starts:
        out, err = start.communicate(timeout=300)
        assert start.returncode == 0, err
        assert "llamabox runtime, version" in out
    entries = sorted(p.name for p in (cache / "runtime").iterdir())
    # One published link and the folder it names; the starts that lost the race removed their copies.
    assert len(entries) == 2 and runtime_id in entries, entries
    assert (cache / "runtime" / runtime_id).is_symlink()


@pytest.mark.parametrize(
    "damage",
    ["delete a CPU variant", "cut a library short", "delete libpython", "delete the file list"],
)
def test_a_damaged_runtime_is_unpacked_again_never_loaded(bundle: Path, tmp_path: Path, reference: str, runtime_id: str, damage: str) -> None:
    cache = tmp_path / "cache"
    env = env_with(LLAMABOX_CACHE=str(cache))
    answered(run([bundle, *PROMPT], env), reference)
    folder = (cache / "runtime" / runtime_id).resolve()
    internal = folder / "_internal"
    victim = {
        "delete a CPU variant": internal / "ggml-backends" / "libggml-cpu-x64.so",
        "cut a library short": internal / "llama_cpp" / "lib" / "libllama.so",
        "delete libpython": internal / "libpython3.11.so.1.0",
        "delete the file list": folder / ".llamabox-files",
    }[damage]
    size = victim.stat().st_size
    os.utime(folder, (folder.stat().st_atime, folder.stat().st_mtime - 120))  # unpacked a while ago
    if damage == "cut a library short":
        os.truncate(victim, size // 2)
    else:
        victim.unlink()
    repaired = run([bundle, *PROMPT], env)
    answered(repaired, reference)
    # libpython is checked by the launcher before Python starts; the rest by the runtime's own check.
    expected = PREPARING if damage == "delete libpython" else "is damaged"
    assert expected in repaired.stderr, repaired.stderr
    fixed = (cache / "runtime" / runtime_id).resolve() / victim.relative_to(folder)
    assert fixed.stat().st_size == size
    quiet = run([bundle, *PROMPT], env)
    answered(quiet, reference)
    assert "damaged" not in quiet.stderr and PREPARING not in quiet.stderr
    assert len(list((cache / "runtime").iterdir())) == 2  # the damaged copy is gone


@pytest.mark.parametrize("options", ["ro", "noexec"])
def test_a_cache_that_cannot_be_used_falls_back_to_a_temporary_folder(
    bundle: Path, tmp_path: Path, reference: str, mount: callable, options: str
) -> None:
    cache = mount(options)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = env_with(LLAMABOX_CACHE=str(cache / "llamabox"), TMPDIR=str(temp))
    result = run([bundle, *PROMPT], env)
    answered(result, reference)
    assert "using a temporary folder for this run" in result.stderr and "LLAMABOX_CACHE" in result.stderr
    assert list(temp.iterdir()) == []  # removed at exit
    if options == "noexec":  # tested before anything was unpacked there
        assert not (cache / "llamabox" / "runtime").exists() or list((cache / "llamabox" / "runtime").iterdir()) == []


def test_home_unset_or_read_only(bundle: Path, tmp_path: Path, reference: str, mount: callable) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    no_home = run([bundle, *PROMPT], env_with(HOME=None, XDG_CACHE_HOME=None, TMPDIR=str(temp)))
    answered(no_home, reference)
    assert "HOME is not set" in no_home.stderr
    read_only_home = mount("ro", "home")
    result = run([bundle, *PROMPT], env_with(HOME=str(read_only_home), XDG_CACHE_HOME=None, TMPDIR=str(temp)))
    answered(result, reference)
    assert f"cannot write to or run programs from {read_only_home}/.cache/llamabox/runtime" in result.stderr
    assert list(temp.iterdir()) == []


def test_odd_paths_a_read_only_bundle_and_no_network(bundle: Path, tmp_path: Path, reference: str) -> None:
    folder = tmp_path / "mes modèles" / "日本語 dir"
    folder.mkdir(parents=True)
    copy = folder / "smöl lm2 ✓.run"
    shutil.copyfile(bundle, copy)
    copy.chmod(0o555)
    env = env_with(LLAMABOX_CACHE=str(tmp_path / "cache with spaces ü"))
    answered(run([copy, *PROMPT], env), reference)
    # Found through PATH, run through sh from its folder, and with no network at all.
    answered(run([copy.name, *PROMPT], {**env, "PATH": f"{folder}{os.pathsep}{env['PATH']}"}), reference)
    answered(run(["sh", copy.name, *PROMPT], env, cwd=folder), reference)
    if shutil.which("bash"):  # macOS's /bin/sh is bash in POSIX mode; Debian's is dash
        answered(run(["bash", "--posix", copy.name, *PROMPT], env, cwd=folder), reference)
    if os.geteuid() == 0 and shutil.which("unshare"):
        answered(run(["unshare", "-n", copy, *PROMPT], env), reference)
    if os.geteuid() == 0:  # the bundle on a read-only mount
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            answered(run([copy, *PROMPT], env), reference)
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_downloads_cut_short_are_explained(bundle: Path, tmp_path: Path) -> None:
    with open(bundle, "rb") as f:
        header = bundle_format.read_stub_header(f)
        trailer = bundle_format.read_trailer(f)
    assert header is not None and trailer is not None
    env = env_with(LLAMABOX_CACHE=str(tmp_path / "cache"))
    for name, keep in [("in its runtime", header.payload_offset + header.payload_size // 2), ("in the model", trailer.model_offset + 1000)]:
        cut = tmp_path / f"cut {name}.run"
        with open(bundle, "rb") as src, open(cut, "wb") as dst:
            dst.write(src.read(keep))
        cut.chmod(0o755)
        result = run([cut, *PROMPT], env)
        assert result.returncode == 1, (name, result)
        assert "Traceback" not in result.stderr
        assert "is incomplete" in result.stderr and "copy or download it again" in result.stderr, (name, result.stderr)


@pytest.mark.parametrize("where", ["inside the packed data", "in the gzip checksum at its end"])
def test_a_damaged_runtime_payload_is_refused_and_never_cached(bundle: Path, tmp_path: Path, where: str) -> None:
    """One bit flipped in the packed runtime. At its end only the checksum is wrong: tar has unpacked every file
    whole by then, and only gzip's status, which sh's pipes drop, tells."""
    with open(bundle, "rb") as f:
        header = bundle_format.read_stub_header(f)
    assert header is not None
    damaged = tmp_path / "damaged.run"
    shutil.copy(bundle, damaged)
    offset = header.payload_size // 2 if where == "inside the packed data" else header.payload_size - 8  # CRC-32
    with open(damaged, "r+b") as f:
        f.seek(header.payload_offset + offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x20]))
    cache = tmp_path / "cache"
    result = run([damaged, *PROMPT], env_with(LLAMABOX_CACHE=str(cache)))
    assert result.returncode == 1 and not result.stdout, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"llamabox: the runtime inside {damaged} is damaged; copy or download it again"
    assert "temporary folder" not in result.stderr and "Traceback" not in result.stderr
    assert list((cache / "runtime").iterdir()) == []


def test_the_stub_alone_asks_for_a_model(stub: Path, tmp_path: Path) -> None:
    result = run([stub, "-p", "hi"], env_with(LLAMABOX_CACHE=str(tmp_path / "cache")))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "runtime stub without a model; run it with -m MODEL.gguf" in result.stderr

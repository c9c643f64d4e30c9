"""The portable Linux stub: every ELF file in it needs glibc 2.31 at most, and a bundle on it answers
inside a minimal Debian 11 root (glibc 2.31), as on a colleague's older Linux.

The stub under test is the session's (tests/conftest.py: `build.py`, which builds the portable stub
where scripts/build_portable.sh is prepared, i.e. after setup.sh as root on Linux x86-64). The
Debian 11 root is made once with debootstrap and cached; it is bare (`--variant=minbase`): no
Python, no compiler, nothing the build root has.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bundler import glibc, stubs
from runtime.packaged import cache_dir
from runtime.platform_tag import current_platform
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

PROMPT = ["-p", "Write one sentence about cats.", "--temp", "0", "-n", "16"]
DEBIAN_11 = "bullseye"
MIRROR = os.environ.get("LLAMABOX_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def portable_build_prepared() -> bool:
    return subprocess.run([str(ROOT / "scripts" / "build_portable.sh"), "ready"], cwd=ROOT).returncode == 0


@pytest.fixture(scope="module")
def portable_stub(stub: Path) -> Path:
    """The session's stub, where it is meant to be portable (else skip: a stub for this machine only)."""
    if current_platform() != "linux-x86_64":
        pytest.skip("the portable stub is built for Linux x86-64")
    if not os.environ.get("LLAMABOX_TEST_STUB") and not portable_build_prepared():
        pytest.skip("the portable build is not prepared here (scripts/setup.sh as root on Linux x86-64 prepares it)")
    return stub


def objdump_glibc(data: bytes) -> glibc.Version | None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        out = subprocess.run(["objdump", "-T", f.name], capture_output=True, text=True, check=True).stdout
    versions = re.findall(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?", out)
    return max((tuple(int(p) for p in v if p) for v in versions), default=None)


def test_every_elf_file_needs_glibc_2_31_at_most(portable_stub: Path) -> None:
    needs = glibc.stub_needs(portable_stub)
    names = {n.name for n in needs}
    # The libraries that needed 2.34 to 2.36 before the portable build, all measured.
    for expected in ("(bootloader)", "libpython3.11.so.1.0", "libstdc++.so.6", "llama_cpp/lib/libllama.so"):
        assert expected in names, sorted(names)
    assert sum("libggml-cpu-" in name for name in names) >= 10
    over = [(n.name, glibc.format_version(n.glibc)) for n in needs if n.glibc and n.glibc > glibc.TARGET]
    assert not over, f"files needing glibc over {glibc.format_version(glibc.TARGET)}: {over}"
    # What build.py recorded in the stub's description is what the files say.
    assert stubs.read_stub(portable_stub).min_glibc == glibc.format_version(glibc.highest(needs))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_elf_reader_agrees_with_objdump(portable_stub: Path) -> None:
    checked = 0
    for name, data in glibc.elf_files(portable_stub):
        assert objdump_glibc(data) == glibc.glibc_needed(data), name
        checked += 1
    assert checked > 50


def test_build_refuses_a_stub_over_its_limit(stub: Path, tmp_path: Path) -> None:
    import build

    copy = tmp_path / stub.name
    shutil.copy(stub, copy)
    needed = stubs.read_stub(copy).min_glibc
    assert needed, "build.py recorded no min_glibc"
    with pytest.raises(SystemExit, match=r"refused: files in the stub need glibc over 2\.14"):
        build.check_glibc(copy, (2, 14))
    assert not copy.exists()


def test_bundle_built_on_the_portable_stub_says_so(portable_stub: Path, bundle: Path) -> None:
    from tests.conftest import llamabox

    result = llamabox("inspect", bundle)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("Needs glibc:"))
    assert "Debian 11, Ubuntu 20.04" in line, line


# --- Inside a Debian 11 root -------------------------------------------------------------------


def _make_debian11(root: Path) -> None:
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    made = subprocess.run(
        ["debootstrap", "--variant=minbase", DEBIAN_11, str(partial), MIRROR],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if made.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.skip(f"debootstrap could not make a Debian 11 root: {made.stdout[-300:]}{made.stderr[-300:]}")
    partial.rename(root)


@pytest.fixture(scope="module")
def debian11(portable_stub: Path) -> Path:
    """A minimal Debian 11 root filesystem, made once with debootstrap and cached."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    if shutil.which("debootstrap") is None or shutil.which("unshare") is None:
        pytest.skip("needs debootstrap and unshare (apt-get install debootstrap util-linux)")
    root = cache_dir() / "test-roots" / f"debian-{DEBIAN_11}-minbase"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test sessions side by side make it once
        if not (root / "etc" / "debian_version").exists():
            _make_debian11(root)
    return root


@pytest.fixture(scope="module")
def bundle_in_root(debian11: Path, bundle: Path) -> Iterator[str]:
    """The session's bundle copied into the Debian 11 root; its path inside the root."""
    place = Path(tempfile.mkdtemp(prefix="llamabox-test-", dir=debian11 / "opt"))
    shutil.copy2(bundle, place / "smollm2.run")
    yield f"/opt/{place.name}/smollm2.run"
    shutil.rmtree(place)


def in_root(root: Path, *command: str) -> list[str]:
    """A command line that runs `command` chrooted into `root`, with its own /proc (a private mount
    namespace: nothing is left mounted when it ends)."""
    script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root), *command]


def test_the_root_is_debian_11_with_glibc_2_31(debian11: Path) -> None:
    result = subprocess.run(in_root(debian11, "/usr/bin/ldd", "--version"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2.31" in result.stdout.splitlines()[0], result.stdout
    assert (debian11 / "etc" / "debian_version").read_text().startswith("11.")
    assert not list((debian11 / "usr" / "bin").glob("python3*")), "the test root must not have a Python"


def test_prompt_answers_inside_debian_11(debian11: Path, bundle_in_root: str, bundle: Path) -> None:
    inside = subprocess.run(in_root(debian11, bundle_in_root, *PROMPT), capture_output=True, text=True, timeout=300)
    assert inside.returncode == 0, inside.stderr[-2000:]
    assert "GLIBC" not in inside.stderr
    here = subprocess.run([str(bundle), *PROMPT], capture_output=True, text=True, timeout=300)
    # The same greedy answer as on this machine, word for word.
    assert "cat" in inside.stdout.lower()
    assert inside.stdout == here.stdout


def test_server_answers_openai_requests_inside_debian_11(debian11: Path, bundle_in_root: str) -> None:
    port = free_port()
    command = in_root(debian11, bundle_in_root, "--nobrowser", "--port", str(port), "--temp", "0")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server in the Debian 11 root never became healthy")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
        reply = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Write one sentence about cats."}], max_tokens=16
        )
        assert reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens > 0
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

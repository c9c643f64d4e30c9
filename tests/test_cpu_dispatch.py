"""One runtime on emulated older CPUs: each loads the best kernels it can run, all answer the same.

qemu-user runs one process on an emulated CPU and does not follow exec. The bundled executable is
a PyInstaller onefile program whose bootloader starts itself again as a child, so these tests run
the runtime from source instead: the same Python, the same llama-cpp-python build and the same CPU
variant libraries that build.py packs into the stub (it collects exactly these files), so what
runs here is what ships. The x86-64 baseline (qemu64: no SSSE3, no SSE4) proves that nothing but
the variant libraries needs more than the baseline; it is why NumPy is held below 2.4.

qemu-user passes the environment through. Some machines (this project's test machines among them)
set OPENBLAS_CORETYPE=Haswell, which makes NumPy's OpenBLAS load Haswell kernels whatever CPU is
emulated, and die with SIGILL at `import numpy`. The runtime drops that setting (runtime/openblas.py);
these tests set it on every host, so that they prove that, and do not depend on the host's environment.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 emulation"),
    pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (scripts/setup.sh installs it as root)"),
]

PROMPT = ["-p", "Write one sentence about cats.", "--temp", "0", "-n", "12"]
# (qemu CPU model, the variant llama.cpp's scoring must pick there)
EMULATED = [("qemu64", "x64"), ("Nehalem", "sse42"), ("SandyBridge", "sandybridge"), ("Haswell", "haswell")]


HOSTILE_ENV = {"OPENBLAS_CORETYPE": "Haswell"}


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The kernel self-test's verdicts for emulated CPUs go into a cache of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        patch.delenv("LLAMABOX_CACHE", raising=False)
        yield


def runtime(cpu: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "runtime", *args]
    if cpu is not None:
        command = ["qemu-x86_64", "-cpu", cpu, *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **HOSTILE_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def loaded_variant(info: str) -> tuple[str, list[str]]:
    match = re.search(r"CPU kernels loaded: (\S+) .*runnable here: ([^)]*)\)", info)
    assert match, info
    return match.group(1), match.group(2).split(", ")


@pytest.fixture(scope="module")
def native_answer(smollm2: Path) -> str:
    return runtime(None, "-m", str(smollm2), *PROMPT).stdout


def test_native_loads_the_best_variant(smollm2: Path) -> None:
    variant, runnable_by_score = loaded_variant(runtime(None, "-m", str(smollm2), "--info").stdout)
    assert variant == runnable_by_score[-1]


@pytest.mark.parametrize(("cpu", "expected"), EMULATED)
def test_emulated_cpu(smollm2: Path, native_answer: str, cpu: str, expected: str) -> None:
    info = runtime(cpu, "-m", str(smollm2), "--info").stdout
    variant, _ = loaded_variant(info)
    assert variant == expected
    # The kernel self-test ran on the emulated CPU too: the chosen kernels passed it (x64 is its reference).
    proof = "the portable kernels, the self-test's reference" if expected == "x64" else "proven on this CPU"
    assert f"CPU kernels self-test: {expected}: {proof}" in info
    if cpu in ("qemu64", "Nehalem"):
        assert "AVX" not in info.split("CPU features:")[1].splitlines()[0]
    assert runtime(cpu, "-m", str(smollm2), *PROMPT).stdout == native_answer


def test_server_modules_load_on_the_baseline() -> None:
    """-p does not import the HTTP stack; its native modules (ssl, asyncio, ...) must start too."""
    code = (
        "from runtime import openblas; openblas.keep_idle(); "
        "import runtime.serve, runtime.server.app, ssl, sqlite3, hashlib; print(hashlib.sha256(b'').hexdigest()[:8])"
    )
    result = subprocess.run(
        ["qemu-x86_64", "-cpu", "qemu64", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=300, env={**os.environ, **HOSTILE_ENV},
    )
    assert result.returncode == 0 and result.stdout.strip() == "e3b0c442", result.stderr[-2000:]


def test_variant_the_cpu_cannot_run_is_refused(smollm2: Path) -> None:
    result = subprocess.run(
        ["qemu-x86_64", "-cpu", "Nehalem", sys.executable, "-m", "runtime", "-m", str(smollm2), "--info", "--cpu-variant", "haswell"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **HOSTILE_ENV},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot run the 'haswell' kernels" in result.stderr and "x64, sse42" in result.stderr

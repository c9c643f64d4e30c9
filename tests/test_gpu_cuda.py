"""The CUDA stub (`build.py --gpu cuda`), checked where no NVIDIA GPU is: what it carries resolves, and it falls
back with one line.

Choosing the CUDA stub and refusing what is not one run everywhere. The stub itself is built by
`scripts/setup.sh --gpu cuda` and `python build.py --gpu cuda` (hours on 2 cores, so not in the default set-up):
the tests on it run where it is, in dist/stubs or at $LLAMABOX_TEST_CUDA_STUB, and are skipped elsewhere.
Measured on a real GPU: BENCHMARKS.md.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from pathlib import Path, PurePath

import pytest

from bundler import glibc, stubs
from runtime.devices import gpu
from runtime.platform_tag import current_platform, stub_file_name
from tests.conftest import ROOT, SOURCE_DATE_EPOCH, llamabox

CUDA_STUB = Path(os.environ.get("LLAMABOX_TEST_CUDA_STUB") or ROOT / "dist" / "stubs" / stub_file_name(current_platform(), "cuda"))
# A driver too old for the CUDA runtime the stub carries: cudart asks it its version first.
OLD_DRIVER_SOURCE = """
int cuDriverGetVersion(int *version) { *version = 12000; return 0; }  /* CUDA 12.0: R525 */
int cuInit(unsigned int flags) { return 0; }
int cuGetProcAddress_v2(const char *name, void **fn, int version, unsigned long long flags, int *status) { *fn = 0; return 500; }
"""
# What a stub may need from the receiving machine: glibc's own libraries and the GPU drivers.
FROM_THE_MACHINE = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1", "ld-linux-x86-64.so.2",
    "libcuda.so.1", "libvulkan.so.1",
}


def _has_nvidia_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


QUESTION = ("-p", "What is the capital of France?", "-n", "8", "--temp", "0")


def cpu_answer(bundle: Path, tmp_path: Path) -> str:
    """The answer of the default stub's bundle, on the CPU kernels too."""
    env = {**os.environ, "LLAMABOX_CACHE": str(tmp_path / "cpu-cache")}
    return subprocess.run([str(bundle), *QUESTION, "--gpu", "off"], capture_output=True, text=True, env=env, timeout=600, check=True).stdout


needs_cuda_stub = pytest.mark.skipif(
    not CUDA_STUB.is_file(), reason=f"no CUDA stub at {CUDA_STUB} (scripts/setup.sh --gpu cuda, then python build.py --gpu cuda)"
)
no_nvidia_driver = pytest.mark.skipif(_has_nvidia_driver(), reason="this machine has the NVIDIA driver")


def test_build_names_the_missing_cuda_stub_and_how_to_make_it(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.run"
    result = llamabox("build", smollm2, "-o", out, "--gpu", "cuda", "--stub-dir", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: no CUDA stub for {current_platform()} in {tmp_path} (looked for {stub_file_name(current_platform(), 'cuda')}); "
        "build it on that platform with `scripts/setup.sh --gpu cuda` and `python build.py --gpu cuda`"
    ]
    assert not out.exists()


def test_build_refuses_a_stub_without_cuda_for_gpu_cuda(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    result = llamabox("build", smollm2, "-o", tmp_path / "m.run", "--gpu", "cuda", "--stub", stub)
    assert result.returncode == 1
    assert f"{stub.name} carries no CUDA backend; give a stub built with `python build.py --gpu cuda`" in result.stderr
    assert "Traceback" not in result.stderr


@no_nvidia_driver
def test_without_the_driver_cuda_says_so_in_one_line(tmp_path: Path) -> None:
    """The driver is looked for before the module and its 600 MB of CUDA libraries are loaded."""
    devices, why = gpu.load("cuda", tmp_path / "libggml-cuda.so")
    assert devices == []
    assert why == "cuda: not usable here (libcuda.so.1 not found); it needs the NVIDIA driver (libcuda.so.1)"


@needs_cuda_stub
def test_the_cuda_stub_carries_cuda_vulkan_and_the_cpu_kernels() -> None:
    listed = llamabox("stubs", "--stub-dir", CUDA_STUB.parent)
    assert listed.returncode == 0, listed.stderr
    entry = listed.stdout.split(f"{CUDA_STUB.name}\n", 1)[1]
    assert "  backends:        CPU (" in entry and entry.splitlines()[4].endswith("), CUDA, VULKAN")
    assert stubs.is_portable(stubs.read_stub(CUDA_STUB))


@needs_cuda_stub
def test_everything_the_cuda_stub_carries_resolves_with_only_the_driver(tmp_path: Path) -> None:
    """ldd's question for every library in the stub, answered without loading any: each one it needs is in the
    stub or is glibc's or a driver's; and nothing needs a glibc newer than 2.31."""
    carried: set[str] = set()
    needed: dict[str, str] = {}
    for name, data in glibc.elf_files(CUDA_STUB):
        assert (glibc.glibc_needed(data) or (0,)) <= glibc.TARGET, name
        copy = tmp_path / "elf"
        copy.write_bytes(data)
        dynamic = subprocess.run(["objdump", "-p", str(copy)], capture_output=True, text=True, check=True).stdout
        carried.add(PurePath(name).name)
        for line in dynamic.splitlines():
            match line.split():
                case ["NEEDED", library]:
                    needed.setdefault(library, name)
                case ["SONAME", soname]:
                    carried.add(soname)
    assert {"libggml-cuda.so", "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13"} <= carried
    assert {lib: by for lib, by in needed.items() if lib not in carried | FROM_THE_MACHINE} == {}


@needs_cuda_stub
@no_nvidia_driver
def test_a_cuda_bundle_without_the_driver_answers_on_the_cpu(smollm2: Path, bundle: Path, tmp_path: Path) -> None:
    cuda_bundle = tmp_path / "smollm2-cuda.run"
    built = llamabox("build", smollm2, "-o", cuda_bundle, "--gpu", "cuda", "--stub-dir", CUDA_STUB.parent, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "LLAMABOX_CACHE": str(tmp_path / "cache")}
    info = subprocess.run([str(cuda_bundle), "--info"], capture_output=True, text=True, env=env, timeout=600)
    assert info.returncode == 0, info.stderr
    assert "GPU: cuda: not usable here (libcuda.so.1 not found); it needs the NVIDIA driver (libcuda.so.1)" in info.stdout.splitlines()
    assert "GPU: no usable GPU: running on the CPU" in info.stdout
    answer = subprocess.run([str(cuda_bundle), *QUESTION], capture_output=True, text=True, env=env, timeout=600)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() and answer.stdout == cpu_answer(bundle, tmp_path)
    assert "Traceback" not in answer.stderr + info.stderr


@needs_cuda_stub
@no_nvidia_driver
def test_a_driver_too_old_is_named_and_the_cpu_answers(smollm2: Path, bundle: Path, tmp_path: Path) -> None:
    driver = tmp_path / "driver"
    driver.mkdir()
    # The module calls some driver functions itself (cuMemCreate and the like): the fake has them, doing nothing.
    module = next(data for name, data in glibc.elf_files(CUDA_STUB) if name.endswith("/libggml-cuda.so"))
    (driver / "module.so").write_bytes(module)
    imported = subprocess.run(["nm", "-D", "--undefined-only", str(driver / "module.so")], capture_output=True, text=True, check=True).stdout
    called = sorted({line.split()[-1].split("@")[0] for line in imported.splitlines() if re.match(r"cu[A-Z]", line.split()[-1])} - {"cuDriverGetVersion", "cuInit", "cuGetProcAddress_v2"})
    (driver / "fake.c").write_text(OLD_DRIVER_SOURCE + "".join(f"int {name}(void) {{ return 999; }}\n" for name in called))
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(driver / "libcuda.so.1"), str(driver / "fake.c")], check=True)
    cuda_bundle = tmp_path / "smollm2-cuda.run"
    built = llamabox("build", smollm2, "-o", cuda_bundle, "--gpu", "cuda", "--stub-dir", CUDA_STUB.parent, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "LLAMABOX_CACHE": str(tmp_path / "cache"), "LD_LIBRARY_PATH": str(driver)}
    info = subprocess.run([str(cuda_bundle), "--info"], capture_output=True, text=True, env=env, timeout=600)
    assert info.returncode == 0, info.stderr
    assert (
        "GPU: cuda: the NVIDIA driver is older than the CUDA runtime 13.0 this runtime carries (CUDA driver version is "
        "insufficient for CUDA runtime version); update it to R580 or newer"
    ) in info.stdout.splitlines()
    answer = subprocess.run([str(cuda_bundle), *QUESTION], capture_output=True, text=True, env=env, timeout=600)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() and answer.stdout == cpu_answer(bundle, tmp_path)
    assert "Traceback" not in answer.stderr + info.stderr

"""A native llama-server and llama-bench built from the same llama.cpp source the pinned llama-cpp-python vendors.

Built once into the cache (not the repository), with GGML_NATIVE=ON, as a user compiling
llama.cpp on their own machine would, and with our patches (scripts/patches/, the same that
scripts/setup.sh applies): without 0001, a native build dies with SIGILL on CPUs with AMX.

For the GPU (benchmarks/gpu.py) a second build loads its backends as modules (GGML_BACKEND_DL, which ggml
allows only without GGML_NATIVE), and the backend modules the stub carries (its CPU variants and the GPU
module) are put beside its programs: native llama.cpp then runs the very kernels the bundle runs, so what
the comparison measures is everything around them (compiling the CUDA backend a second time would take
hours on 2 cores and prove nothing more).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from runtime import packaged
from runtime.devices.cpu import CPU_VARIANT_GLOB

ROOT = Path(__file__).resolve().parent.parent
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_RPC=ON",  # ggml-rpc-server and llama-server --rpc (benchmarks/rpc.py)
]


DL_FLAGS = [flag for flag in CMAKE_FLAGS if flag != "-DGGML_NATIVE=ON"] + [
    "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU=OFF", "-DBUILD_SHARED_LIBS=ON"]
TARGETS = ("llama-server", "llama-bench", "llama-quantize", "ggml-rpc-server")


def llama_server() -> Path:
    return native_tool("llama-server")


def llama_bench() -> Path:
    return native_tool("llama-bench")


def native_gpu_tool(name: str, gpu_files: list[Path]) -> Path:
    """A native llama.cpp program that loads its backends as modules, with copies of the CPU variants and of
    `gpu_files` (a GPU backend's module and the libraries it needs) beside it; run it with LD_LIBRARY_PATH set
    to its folder."""
    binary = native_tool(name, build_name="build-dl", flags=DL_FLAGS)
    for path in [*sorted(packaged.backend_dir().glob(CPU_VARIANT_GLOB)), *gpu_files]:
        target = binary.parent / path.name
        if not target.exists() or target.stat().st_size != path.stat().st_size:
            shutil.copy2(path, target)
    return binary


def native_tool(name: str, build_name: str = "build", flags: list[str] = CMAKE_FLAGS) -> Path:
    """Path of a native llama.cpp program, building the programs first if needed (several minutes, once)."""
    version = importlib.metadata.version("llama-cpp-python")
    patches = sorted((ROOT / "scripts" / "patches").glob("*.patch"))
    patch_id = hashlib.sha256(b"".join(p.read_bytes() for p in patches)).hexdigest()[:12]
    root = packaged.cache_dir() / "native" / f"llama-cpp-python-{version}-{patch_id}"
    binary = root / build_name / "bin" / name
    if binary.exists():
        return binary
    source = root / "src"
    if not (source / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory() as tmp:
            print(f"Fetching the llama-cpp-python {version} source distribution...", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={version}", "-d", tmp],
                check=True,
            )
            archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
                tar.extractall(tmp, members=members, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            for patch in patches:  # the sdist's paths start with vendor/llama.cpp/
                subprocess.run(["patch", "-d", str(vendored), "-p3", "--forward", "--batch", "--quiet", "-i", str(patch)], check=True)
            root.mkdir(parents=True, exist_ok=True)
            vendored.rename(source)
    print(f"Building native llama-server and llama-bench ({' '.join(flags[1:])}; several minutes, once)...", file=sys.stderr)
    build = root / build_name
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


if __name__ == "__main__":
    print(llama_server())

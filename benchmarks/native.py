"""A native llama-server built from the same llama.cpp source the pinned llama-cpp-python vendors.

Built once into the cache (not the repository), with GGML_NATIVE=ON, as a user compiling
llama.cpp on their own machine would.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("LLAMABOX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamabox")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


def llama_server() -> Path:
    """Path of the native llama-server, building it first if needed (several minutes, once)."""
    version = importlib.metadata.version("llama-cpp-python")
    root = CACHE / "native" / f"llama-cpp-python-{version}"
    binary = root / "build" / "bin" / "llama-server"
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
            root.mkdir(parents=True, exist_ok=True)
            vendored.rename(source)
    print("Building native llama-server (GGML_NATIVE=ON; several minutes, once)...", file=sys.stderr)
    build = root / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


if __name__ == "__main__":
    print(llama_server())

"""What the machine can do, and loading the fastest llama.cpp CPU backend it can run.

llama-cpp-python is built with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS: the CPU kernels live in
one library per instruction-set level (libggml-cpu-x64, -sse42, -sandybridge, -haswell, -skylakex,
...), and nothing loads them by itself. Each variant exports llama.cpp's own `ggml_backend_score()`,
which checks the running CPU and returns 0 when the variant cannot run here, else a higher score
for a better fit. We ask every variant for its score and register the best with
`ggml_backend_load()` on the same libggml that libllama uses, so the choice is llama.cpp's, and we
know (and can report) which one it was.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from runtime.errors import BackendError
from runtime.ggml_log import captured_log

_SHARED_SUFFIX = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
_LIB_PREFIX = "" if sys.platform == "win32" else "lib"
CPU_VARIANT_PREFIX = f"{_LIB_PREFIX}ggml-cpu-"

# The x86-64 features worth reporting, as /proc/cpuinfo spells them, with display names.
_X86_FEATURES = {
    "sse4_2": "SSE4.2", "avx": "AVX", "f16c": "F16C", "fma": "FMA", "avx2": "AVX2",
    "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512-VNNI", "avx512_bf16": "AVX-512-BF16", "amx_int8": "AMX-INT8",
}
_ARM_FEATURES = {"asimd": "NEON", "asimddp": "DOTPROD", "i8mm": "I8MM", "sve": "SVE", "sve2": "SVE2"}


@dataclass(frozen=True)
class CpuInfo:
    name: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class CpuBackend:
    variant: str
    path: Path
    score: int


def parse_proc_cpuinfo(text: str) -> CpuInfo:
    """CPU name and notable features from the text of Linux's /proc/cpuinfo (first CPU only)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    table = _X86_FEATURES if "flags" in fields else _ARM_FEATURES
    name = fields.get("model name") or fields.get("Hardware") or fields.get("CPU part") or platform.machine()
    return CpuInfo(name=name, features=tuple(label for flag, label in table.items() if flag in flags))


def cpu_info() -> CpuInfo:
    try:
        return parse_proc_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo(name=platform.processor() or platform.machine(), features=())


def default_threads() -> int:
    """Threads for generation: every core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def llama_library_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def cpu_variant_dir() -> Path:
    """Where the CPU variant libraries are: unpacked beside the stub's files, or pip's bin/."""
    if getattr(sys, "frozen", False):
        return Path(sys._MEIPASS) / "ggml-cpu"  # type: ignore[attr-defined]
    return Path(llama_cpp.__file__).parent.parent / "bin"


def variant_name(path: Path) -> str:
    return path.name.removeprefix(CPU_VARIANT_PREFIX).split(".")[0]


def available_variants(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{CPU_VARIANT_PREFIX}*{_SHARED_SUFFIX}"))


def score_variant(path: Path) -> int:
    """llama.cpp's score of a CPU variant on this machine; 0 means it cannot run here."""
    lib = ctypes.CDLL(str(path))
    try:
        score = getattr(lib, "ggml_backend_score", None)
        if score is None:
            return 0
        score.restype = ctypes.c_int
        return int(score())
    finally:
        _dlclose(lib)


def load_cpu_backend(directory: Path | None = None) -> CpuBackend:
    """Register the best-scoring CPU variant with ggml; BackendError if none can run here."""
    directory = directory or cpu_variant_dir()
    candidates = available_variants(directory)
    if not candidates:
        raise BackendError(f"no llama.cpp CPU libraries in {directory}; the runtime is damaged, download it again")
    scored = [(score_variant(path), path) for path in candidates]
    score, best = max(scored)
    if score <= 0:
        raise BackendError("none of the llama.cpp CPU libraries can run on this CPU")
    ggml = _ggml()
    with captured_log(ggml) as log:
        loaded = ggml.ggml_backend_load(str(best).encode())
    if not loaded:
        detail = log[-1].strip() if log else "no reason given"
        raise BackendError(f"llama.cpp could not load its CPU library {best.name} ({detail})")
    return CpuBackend(variant=variant_name(best), path=best, score=score)


def _ggml() -> ctypes.CDLL:
    """libggml as libllama links it: the one whose backend registry the model loader reads."""
    lib_dir = llama_library_dir()
    for name in (f"{_LIB_PREFIX}ggml{_SHARED_SUFFIX}.0", f"{_LIB_PREFIX}ggml.0{_SHARED_SUFFIX}", f"{_LIB_PREFIX}ggml{_SHARED_SUFFIX}"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            lib.ggml_backend_load.argtypes, lib.ggml_backend_load.restype = [ctypes.c_char_p], ctypes.c_void_p
            return lib
    raise BackendError(f"libggml not found in {lib_dir}; the runtime is damaged, download it again")


def _dlclose(lib: ctypes.CDLL) -> None:
    if sys.platform != "win32":
        import _ctypes

        _ctypes.dlclose(lib._handle)

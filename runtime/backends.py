"""Loading llama.cpp's compute backends: the best CPU kernels this machine can run, and a GPU if any.

llama-cpp-python is built with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS: the CPU kernels live in
one library per instruction-set level (libggml-cpu-x64, -sse42, -sandybridge, -haswell, -skylakex,
... on x86-64; -apple_m1, -apple_m2_m3, -apple_m4 on Apple Silicon), and nothing loads them by
itself. Each variant exports llama.cpp's own `ggml_backend_score()`, which checks the running CPU
and returns 0 when the variant cannot run here, else a higher score for a better fit. We ask every
variant for its score and register the chosen one with `ggml_backend_load()` on the same libggml
that libllama uses, so the choice is llama.cpp's, and we know (and can report) which it was.
GPU backends (Metal, CUDA, Vulkan) are separate libraries in the same directory when the build
includes them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp

from runtime import packaged
from runtime.errors import BackendError
from runtime.ggml_log import captured_log

# ggml names its backend modules lib<name>.so everywhere but Windows (<name>.dll).
_MODULE_PATTERN = "ggml-{}.dll" if sys.platform == "win32" else "libggml-{}.so"
CPU_VARIANT_GLOB = _MODULE_PATTERN.format("cpu-*")
GPU_BACKENDS = ("metal", "cuda", "vulkan", "hip", "sycl")

_DEVICE_GPU, _DEVICE_IGPU = 1, 2


@dataclass(frozen=True)
class VariantScore:
    name: str
    path: Path
    score: int


@dataclass(frozen=True)
class CpuBackend:
    variant: str
    path: Path
    score: int
    runnable: tuple[str, ...]
    proof: str  # the kernel self-test's verdict, e.g. "haswell: proven on this CPU"
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class GpuDevice:
    backend: str
    name: str
    description: str
    memory_bytes: int


@dataclass(frozen=True)
class Offload:
    """Where the model's layers go: a GPU (with how many layers) or the CPU, and why."""

    device: GpuDevice | None
    layers: int
    note: str


def module_file_name(backend: str) -> str:
    """File name of a backend module, e.g. 'cuda' -> libggml-cuda.so."""
    return _MODULE_PATTERN.format(backend)


def variant_name(path: Path) -> str:
    prefix, suffix = CPU_VARIANT_GLOB.split("*")
    return path.name.removeprefix(prefix).removesuffix(suffix)


def forced_variant(scores: list[VariantScore], forced: str) -> VariantScore:
    """The variant named with --cpu-variant, if it exists and this CPU can run it."""
    by_name = {s.name: s for s in scores}
    if forced not in by_name:
        raise BackendError(f"unknown CPU variant {forced!r}; choose one of: {', '.join(s.name for s in scores)}")
    if by_name[forced].score <= 0:
        names = ", ".join(s.name for s in reversed(ranked(scores)))
        raise BackendError(f"this CPU cannot run the {forced!r} kernels (it lacks instructions they use); choose one of: {names}")
    return by_name[forced]


def choose_offload(devices: list[GpuDevice], mode: str, layers: int | None) -> Offload:
    """Offload decision from the GPUs found, --gpu (auto|off) and --gpu-layers (None: all)."""
    if mode == "off":
        return Offload(device=None, layers=0, note="GPU off (--gpu off): running on the CPU")
    if not devices:
        return Offload(device=None, layers=0, note="no usable GPU found: running on the CPU")
    device = max(devices, key=lambda d: d.memory_bytes)
    if layers == 0:
        return Offload(device=None, layers=0, note=f"{device.backend} {device.name} present, --gpu-layers 0: running on the CPU")
    count = -1 if layers is None else layers  # llama.cpp reads -1 as "every layer"
    return Offload(device=device, layers=count, note=f"{device.backend} on {device.description}, {'all' if count < 0 else count} layers")


def variant_scores(directory: Path | None = None, expected: list[str] | None = None) -> tuple[list[VariantScore], list[str]]:
    """llama.cpp's score of every CPU variant in `directory`, and warnings about missing or unreadable ones.

    `expected`: the variants the stub was built with.
    """
    directory = directory or packaged.backend_dir()
    paths = sorted(directory.glob(CPU_VARIANT_GLOB))
    warnings = []
    missing = sorted(set(expected or []) - {variant_name(p) for p in paths})
    if missing:
        warnings.append(f"this runtime lacks the CPU kernels {', '.join(missing)} (damaged download?); using the best of the rest")
    if not paths:
        raise BackendError(f"no llama.cpp CPU libraries in {directory}; the runtime is damaged, download it again")
    return [VariantScore(variant_name(p), p, _score(p, warnings)) for p in paths], warnings


def ranked(scores: list[VariantScore]) -> list[VariantScore]:
    """The variants this CPU can run, best first (the portable one last)."""
    runnable = sorted((s for s in scores if s.score > 0), key=lambda s: s.score, reverse=True)
    if not runnable:
        raise BackendError("none of the llama.cpp CPU libraries can run on this CPU")
    return runnable


def load_cpu_backend(chosen: VariantScore, scores: list[VariantScore], warnings: list[str], proof: str, forced: bool) -> CpuBackend:
    """Register `chosen` with ggml; if it will not load (and was not forced), the portable variant."""
    runnable = tuple(s.name for s in reversed(ranked(scores)))
    if not _load(chosen.path, warnings):
        portable = min((s for s in scores if s.score > 0 and s is not chosen), key=lambda s: s.score, default=None)
        if portable is None or forced or not _load(portable.path, warnings):
            raise BackendError(f"llama.cpp could not load its CPU library {chosen.path.name}; " + "; ".join(warnings))
        warnings.append(f"falling back to the portable {portable.name} kernels")
        chosen = portable
    return CpuBackend(chosen.name, chosen.path, chosen.score, runnable, proof, tuple(warnings))


def register_cpu_variant(path: Path) -> None:
    """Register one CPU variant library with ggml (in the self-test's child process)."""
    warnings: list[str] = []
    if not _load(path, warnings):
        raise BackendError(warnings[0])


def load_gpu_backends(directory: Path | None = None) -> list[GpuDevice]:
    """Register every GPU backend library present and list the GPUs they find."""
    directory = directory or packaged.backend_dir()
    for name in GPU_BACKENDS:
        path = directory / module_file_name(name)
        if path.exists():
            _load(path, [])
    ggml = _ggml()
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) not in (_DEVICE_GPU, _DEVICE_IGPU):
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            GpuDevice(
                backend=ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)).decode(),
                name=ggml.ggml_backend_dev_name(dev).decode(),
                description=ggml.ggml_backend_dev_description(dev).decode(),
                memory_bytes=total.value,
            )
        )
    return devices


def _score(path: Path, warnings: list[str]) -> int:
    """llama.cpp's score of a CPU variant on this machine; 0 if it cannot run here or is unreadable."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        warnings.append(f"cannot open {path.name} ({exc})")
        return 0
    try:
        score = getattr(lib, "ggml_backend_score", None)
        if score is None:
            return 0
        score.restype = ctypes.c_int
        return int(score())
    finally:
        if sys.platform != "win32":
            import _ctypes

            _ctypes.dlclose(lib._handle)


def _load(path: Path, warnings: list[str]) -> bool:
    ggml = _ggml()
    with captured_log(ggml) as log:
        loaded = ggml.ggml_backend_load(str(path).encode())
    if not loaded:
        warnings.append(f"llama.cpp could not load {path.name} ({log[-1].strip() if log else 'no reason given'})")
    return bool(loaded)


@cache
def _ggml() -> ctypes.CDLL:
    """libggml as libllama links it: the one whose backend registry the model loader reads."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = ["ggml.dll"] if sys.platform == "win32" else ["libggml.so.0", "libggml.0.dylib", "libggml.dylib", "libggml.so"]
    for name in names:
        if (lib_dir / name).exists():
            return _declare(ctypes.CDLL(str(lib_dir / name)))
    raise BackendError(f"libggml not found in {lib_dir}; the runtime is damaged, download it again")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, s = ctypes.c_void_p, ctypes.c_size_t
    for name, argtypes, restype in [
        ("ggml_backend_load", [ctypes.c_char_p], p),
        ("ggml_backend_dev_count", [], s),
        ("ggml_backend_dev_get", [s], p),
        ("ggml_backend_dev_type", [p], ctypes.c_int),
        ("ggml_backend_dev_name", [p], ctypes.c_char_p),
        ("ggml_backend_dev_description", [p], ctypes.c_char_p),
        ("ggml_backend_dev_memory", [p, ctypes.POINTER(s), ctypes.POINTER(s)], None),
        ("ggml_backend_dev_backend_reg", [p], p),
        ("ggml_backend_reg_name", [p], ctypes.c_char_p),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def default_threads() -> int:
    """Threads for generation: every core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)

"""The GPU backends a runtime carries (Vulkan in every Linux stub, CUDA in the CUDA stub, Metal on Apple
Silicon), which of them can run here, and the GPUs they find.

A GPU backend is a module beside the CPU variants (GGML_BACKEND_DL). Loading one initialises the GPU's
runtime (Vulkan instance, CUDA context), so it happens only in the process that runs the model, after
every fork, or in the self-test's child (proof/gpu.py), which proves each GPU before the model process
trusts it. What the receiving machine needs is its driver: the Vulkan loader (libvulkan.so.1) and an ICD
for Vulkan, libcuda.so.1 for CUDA (the CUDA stub carries the CUDA runtime and cuBLAS beside the module).
Where it lacks one, the module does not load, and the user reads why in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime import packaged
from runtime.devices import ggml

# In order of preference for the same GPU: a vendor's own backend before Vulkan, which sees every GPU.
GPU_BACKENDS = ("metal", "cuda", "hip", "sycl", "vulkan")
_WINDOWS = sys.platform == "win32"
# What each backend's module needs from the machine, for the one line that says why it did not load.
_NEEDS = {
    "vulkan": "a GPU driver with Vulkan (vulkan-1.dll)" if _WINDOWS else "the Vulkan loader (libvulkan.so.1) and a Vulkan driver",
    "cuda": "the NVIDIA driver (libcuda.so.1)",
    "hip": "AMD's ROCm runtime",
    "sycl": "Intel's oneAPI runtime",
    "metal": "macOS 13 or newer",
}
# The driver library each backend needs from the machine, tried before the module and its companions are loaded.
# On Windows that is also how a missing one is named: ggml's loader gives no reason there.
_DRIVERS = {"vulkan": "vulkan-1.dll"} if _WINDOWS else {"cuda": "libcuda.so.1"}
# Libraries a backend's module needs that the stub carries beside it (scripts/gpu_backends.sh copies them
# there), in the order they must be loaded: the module finds them by soname once they are in the process.
COMPANIONS = {"cuda": ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13")}
# What a backend logs when its runtime does not start, and the words that follow it in the log.
_INIT_FAILURE = {"cuda": "failed to initialize CUDA: "}


@dataclass(frozen=True)
class GpuDevice:
    backend: str  # the module: "vulkan", "cuda"
    index: int  # in ggml's device registry, for llama_model_params.devices
    name: str  # "Vulkan0", "CUDA0"
    description: str  # "NVIDIA H100 80GB HBM3"
    free_bytes: int
    total_bytes: int
    endpoint: str | None = None  # an RPC worker's HOST:PORT (backend "rpc"); None: a GPU in this machine

    @property
    def key(self) -> str:
        """What identifies this GPU across starts (the self-test's verdicts are kept per key)."""
        return f"{self.name} {self.description} {self.total_bytes}"


def modules(directory: Path | None = None) -> dict[str, Path]:
    """The GPU backend modules this runtime carries, best first."""
    directory = directory or packaged.backend_dir()
    found = {name: directory / ggml.module_file_name(name) for name in GPU_BACKENDS}
    return {name: path for name, path in found.items() if path.exists()}


def load(backend: str, path: Path) -> tuple[list[GpuDevice], str | None]:
    """Register one GPU module and list its GPUs; or, where it does not load, why not (one line)."""
    needs = _NEEDS.get(backend, "its driver")
    driver = _DRIVERS.get(backend)
    if driver is not None:
        try:
            ctypes.CDLL(driver, mode=ctypes.RTLD_GLOBAL)
        except OSError:  # its words are PyInstaller's in the frozen runtime ("... not found when the application was frozen")
            return [], f"{backend}: not usable here ({driver} not found); it needs {needs}"
    for companion in COMPANIONS.get(backend, ()):
        if (path.parent / companion).exists():
            ctypes.CDLL(str(path.parent / companion), mode=ctypes.RTLD_GLOBAL)
    warnings: list[str] = []
    log: list[str] = []
    before = {d.index for d in ggml.devices()}
    if not ggml.load_module(path, warnings, log):
        return [], f"{backend}: not usable here ({_reason(warnings[0], path)}); it needs {needs}"
    failed = _INIT_FAILURE.get(backend)
    why_not = next((line.split(failed, 1)[1].strip() for line in log if failed and failed in line), None)
    gpus = [
        GpuDevice(backend, d.index, d.name, d.description, d.free_bytes, d.total_bytes)
        for d in ggml.devices()
        if d.index not in before and d.kind in (ggml.DEVICE_GPU, ggml.DEVICE_IGPU)
    ]
    if not gpus and why_not and "insufficient" in why_not:
        return [], f"{backend}: the NVIDIA driver is older than the CUDA runtime 13.0 this runtime carries ({why_not}); update it to R580 or newer"
    if not gpus and why_not:
        return [], f"{backend}: no GPU found ({why_not})"
    if not gpus:
        return [], f"{backend}: no GPU found{_vulkan_hint() if backend == 'vulkan' else ''}"
    return gpus, None


def driver_fingerprint(backend: str) -> str:
    """What changes when the machine's GPU driver changes: the driver files' names, sizes and times.

    Read from the file system, without loading any GPU runtime, so that a start whose GPUs are already
    proven pays nothing for the question.
    """
    if sys.platform == "darwin":
        import platform

        return f"macOS {platform.mac_ver()[0]}"
    if _WINDOWS:
        return _windows_driver_fingerprint()
    patterns = {
        "vulkan": [
            *(f"{d}/vulkan/icd.d/*.json" for d in ("/usr/share", "/usr/local/share", "/etc")),
            *(os.environ.get(v, "") for v in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES")),
            *(f"{d}/libvulkan.so.1" for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")),
        ],
        "cuda": ["/proc/driver/nvidia/version", "/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1"],
    }.get(backend, [])
    paths = [path for pattern in patterns for part in pattern.split(os.pathsep) if part for path in sorted(glob.glob(part))]
    digest = hashlib.sha256()
    for path in paths:
        try:
            real = os.path.realpath(path)
            stat = os.stat(real)
            digest.update(f"{real}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            if real.endswith(".json") or real.startswith("/proc/"):
                digest.update(Path(real).read_bytes())
        except OSError:
            continue
    # A GPU added or taken out: its device files' names.
    digest.update(" ".join(sorted(glob.glob("/dev/dri/renderD*")) + sorted(glob.glob("/dev/nvidia[0-9]*"))).encode())
    # Which GPUs the backends may see, and where the dynamic loader may find another driver library.
    for variable in ("GGML_VK_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH"):
        digest.update(f"{variable}={os.environ.get(variable, '')}\n".encode())
    return digest.hexdigest()[:16]


# Where Windows keeps its display drivers (one subkey per adapter) and the Vulkan drivers registered apart from them.
_DISPLAY_ADAPTERS = r"SYSTEM\CurrentControlSet\Control\Class\{4d36e968-e325-11ce-bfc1-08002be10318}"
_VULKAN_DRIVERS = r"SOFTWARE\Khronos\Vulkan\Drivers"


def _windows_driver_fingerprint() -> str:
    """driver_fingerprint on Windows: each display adapter's driver version, the registered Vulkan drivers and
    the Vulkan loader's size and time."""
    import winreg

    digest = hashlib.sha256()

    def values(path: str) -> None:
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path) as key:
                for i in range(winreg.QueryInfoKey(key)[1]):
                    name, value, _kind = winreg.EnumValue(key, i)
                    if path == _VULKAN_DRIVERS or name in ("DriverDesc", "DriverVersion", "DriverDate"):
                        digest.update(f"{path}:{name}={value}\n".encode())
        except OSError:  # no such key, or not readable: nothing to add
            pass

    values(_VULKAN_DRIVERS)
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, _DISPLAY_ADAPTERS) as adapters:
            subkeys = [winreg.EnumKey(adapters, i) for i in range(winreg.QueryInfoKey(adapters)[0])]
    except OSError:
        subkeys = []
    for subkey in subkeys:
        values(f"{_DISPLAY_ADAPTERS}\\{subkey}")
    loader = Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "vulkan-1.dll"
    with contextlib.suppress(OSError):
        stat = loader.stat()
        digest.update(f"{loader}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for variable in ("GGML_VK_VISIBLE_DEVICES", "VK_ICD_FILENAMES", "VK_DRIVER_FILES"):
        digest.update(f"{variable}={os.environ.get(variable, '')}\n".encode())
    return digest.hexdigest()[:16]


def _reason(warning: str, path: Path) -> str:
    """The heart of why ggml could not load a module: the dynamic loader's words, without the paths it repeats."""
    reason = warning.split(f"could not load {path.name} (", 1)[-1].removesuffix(")")
    return reason.split(f"{path}: ", 1)[-1].strip()


def _vulkan_hint() -> str:
    if os.environ.get("GGML_VK_VISIBLE_DEVICES"):
        return f" among GGML_VK_VISIBLE_DEVICES={os.environ['GGML_VK_VISIBLE_DEVICES']}"
    return " (software devices such as llvmpipe are used only when GGML_VK_VISIBLE_DEVICES names them)"

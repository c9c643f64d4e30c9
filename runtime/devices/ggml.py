"""ggml's backend registry, reached with ctypes: loading backend modules and asking about their devices.

llama-cpp-python is built with GGML_BACKEND_DL: every backend (each CPU variant, Vulkan, CUDA, Metal)
is a module that nothing loads by itself. They are registered with `ggml_backend_load()` on the same
libggml that libllama uses, so the model loader sees exactly the devices registered here.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp

from runtime.errors import BackendError
from runtime.ggml_log import LOG_CALLBACK, captured_log

# ggml names its backend modules lib<name>.so everywhere but Windows (<name>.dll).
_MODULE_PATTERN = "ggml-{}.dll" if sys.platform == "win32" else "libggml-{}.so"

# ggml_abort_callback_t: called with the message before ggml aborts the process (ggml_set_abort_callback)
ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

# enum ggml_backend_dev_type: the kinds of device that count as GPUs
DEVICE_GPU, DEVICE_IGPU = 1, 2


def module_file_name(backend: str) -> str:
    """File name of a backend module, e.g. 'cuda' -> libggml-cuda.so."""
    return _MODULE_PATTERN.format(backend)


def load_module(path: Path, warnings: list[str], log: list[str] | None = None) -> bool:
    """Register one backend module; on failure, say why in `warnings` (ggml's own last log line). What the
    module logged while it started goes to `log`."""
    lib = ggml()
    with captured_log(lib) as captured:
        loaded = lib.ggml_backend_load(str(path).encode())
    if log is not None:
        log.extend(captured)
    if not loaded:
        warnings.append(f"llama.cpp could not load {path.name} ({captured[-1].strip() if captured else 'no reason given'})")
    return bool(loaded)


@dataclass(frozen=True)
class Device:
    """One device that a registered backend offers, as ggml describes it."""

    index: int  # in ggml's device registry
    backend: str  # the registry's name: "Vulkan", "CUDA", "Metal", "CPU"
    name: str  # "Vulkan0", "CUDA0"
    description: str  # "NVIDIA H100 80GB HBM3"
    kind: int
    free_bytes: int
    total_bytes: int


def devices() -> list[Device]:
    """Every device the registered backends offer, in ggml's order."""
    lib = ggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                index=i,
                backend=lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode(),
                name=lib.ggml_backend_dev_name(dev).decode(),
                description=lib.ggml_backend_dev_description(dev).decode(),
                kind=lib.ggml_backend_dev_type(dev),
                free_bytes=free.value,
                total_bytes=total.value,
            )
        )
    return found


def row_size(ggml_type: int, n: int) -> int:
    """Bytes that `n` values of a ggml type take (quantized types: in whole blocks)."""
    return ggml().ggml_row_size(ggml_type, n)


def device_handle(index: int) -> int:
    """The ggml_backend_dev_t of device `index`, for llama_model_params.devices."""
    return ggml().ggml_backend_dev_get(index)


@cache
def ggml() -> ctypes.CDLL:
    """libggml as libllama links it: the one whose backend registry the model loader reads."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if sys.platform == "win32":
        # A DLL exports only its own functions (dlsym also searches a library's dependencies): the device
        # functions are ggml-base.dll's, the registry's are ggml.dll's.
        names = ["ggml.dll"]
        bases = [ctypes.CDLL(str(lib_dir / "ggml-base.dll"))] if (lib_dir / "ggml-base.dll").exists() else []
    else:
        names, bases = ["libggml.so.0", "libggml.0.dylib", "libggml.dylib", "libggml.so"], []
    for name in names:
        if (lib_dir / name).exists():
            return _declare(ctypes.CDLL(str(lib_dir / name)), bases)
    raise BackendError(f"libggml not found in {lib_dir}; the runtime is damaged, download it again")


def _declare(lib: ctypes.CDLL, elsewhere: list[ctypes.CDLL]) -> ctypes.CDLL:
    """`lib` with the functions used here declared; those it does not export are looked up in `elsewhere`."""
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
        ("ggml_backend_reg_by_name", [ctypes.c_char_p], p),
        ("ggml_backend_register", [p], None),
        ("ggml_backend_reg_get_proc_address", [p, ctypes.c_char_p], p),
        ("ggml_row_size", [ctypes.c_int, ctypes.c_int64], s),
        ("ggml_log_set", [LOG_CALLBACK, p], None),
        ("ggml_set_abort_callback", [ABORT_CALLBACK], p),
    ]:
        fn = next((getattr(owner, name) for owner in (lib, *elsewhere) if hasattr(owner, name)), None)
        if fn is None:
            raise BackendError(f"libggml lacks {name}; the runtime is damaged, download it again")
        fn.argtypes, fn.restype = argtypes, restype
        setattr(lib, name, fn)
    return lib


class DeviceList:
    """A NULL-terminated ggml_backend_dev_t array for llama_model_params.devices, kept alive with this object.

    Always explicit: llama.cpp reads no array as "every registered GPU". An empty list: the CPU alone.
    """

    def __init__(self, indices: list[int]) -> None:
        self._array = (ctypes.c_void_p * (len(indices) + 1))(*(device_handle(i) for i in indices), None)

    @property
    def address(self) -> int:
        return ctypes.addressof(self._array)

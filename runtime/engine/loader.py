"""Loading the weights in place: from a whole GGUF file, or from the region of a bundle that holds one.

llama.cpp can load a model from an open FILE* positioned at the GGUF (llama_model_load_from_file_ptr)
and then memory-maps the weights straight from that file, so a bundle's model is never copied.
llama-cpp-python's LlamaModel only loads from a path; this subclass, the one reach into its private
module, loads from a file region and keeps the FILE open as long as the model lives.

The FILE must come from the C runtime that llama.cpp itself uses: llama.cpp reads it, seeks it and
asks that runtime for its OS handle to map it, and a FILE from another C runtime crashes it. On
Linux and macOS there is one libc. On Windows, llama.dll built with MSVC uses the universal C runtime
(ucrtbase.dll, imported through the api-ms-win-crt-* names) and one built with MinGW uses msvcrt.dll;
which one is read from llama.dll's imports. Seeks are 64-bit everywhere (fseeko, _fseeki64) and
Windows paths are opened as wide strings (_wfopen), so any path and any offset work.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

import llama_cpp
import llama_cpp._internals as internals

from runtime.devices.ggml import DeviceList
from runtime.engine.memory import kv_bytes_per_token
from runtime.devices.offload import ModelFacts
from runtime.errors import ModelFileError
from runtime.model_source import ModelLocation
from runtime.engine.quiet import quiet

_SEEK_SET = 0


def windows_crt_name(dll: bytes) -> str:
    """The C runtime a Windows DLL's bytes import: 'msvcrt' (MinGW builds) or 'ucrtbase' (MSVC builds)."""
    lowered = dll.lower()
    if b"msvcrt.dll" in lowered and b"api-ms-win-crt-" not in lowered and b"ucrtbase.dll" not in lowered:
        return "msvcrt"
    return "ucrtbase"


class _CRuntime:
    """fopen / 64-bit fseek / fclose of the C runtime llama.cpp uses."""

    def __init__(self) -> None:
        if sys.platform == "win32":
            dll_path = getattr(llama_cpp.llama_cpp._lib, "_name", None)
            with open(dll_path, "rb") as f:
                lib = ctypes.CDLL(windows_crt_name(f.read()))
            self._open, self._seek = lib._wfopen, lib._fseeki64
            self._open.argtypes = [ctypes.c_wchar_p, ctypes.c_wchar_p]
        else:  # the process's own symbols: its one libc, without find_library's run of ldconfig at every start
            lib = ctypes.CDLL(None)
            self._open, self._seek = lib.fopen, lib.fseeko
            self._open.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self._open.restype = ctypes.c_void_p
        self._seek.argtypes, self._seek.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int
        self.close = lib.fclose
        self.close.argtypes, self.close.restype = [ctypes.c_void_p], ctypes.c_int

    def open(self, path: str) -> int | None:
        return self._open(path, "rb") if sys.platform == "win32" else self._open(os.fsencode(path), b"rb")

    def seek(self, fp: int, offset: int) -> bool:
        return self._seek(fp, offset, _SEEK_SET) == 0


_libc = _CRuntime()


@contextlib.contextmanager
def c_file_at(location: ModelLocation) -> Iterator[int | None]:
    """A FILE of llama.cpp's C runtime at `location` (None where it cannot be opened there), closed afterwards: for
    what llama.cpp reads once (a LoRA adapter) from a file region."""
    fp = _libc.open(str(location.path))
    try:
        yield fp if fp and _libc.seek(fp, location.offset) else None
    finally:
        if fp:
            _libc.close(fp)

# The private shape this module relies on: checked at import, so a llama-cpp-python upgrade that
# changes it fails loudly here rather than deep inside a load.
assert {"model", "vocab", "tokenize", "token_to_piece", "metadata"} <= set(dir(internals.LlamaModel)) | {"model", "vocab"}


# llama-server's -lm/--load-mode names for llama.cpp's load modes. The weights of a bundle are read from the
# bundle's own region of the file in every mode: mapped in place (auto, mmap), read into memory (none), locked in
# memory (mlock, mmap+mlock), or read around the page cache (dio).
LOAD_MODES = {
    "auto": llama_cpp.LLAMA_LOAD_MODE_AUTO,
    "none": llama_cpp.LLAMA_LOAD_MODE_NONE,
    "mmap": llama_cpp.LLAMA_LOAD_MODE_MMAP,
    "mlock": llama_cpp.LLAMA_LOAD_MODE_MLOCK,
    "mmap+mlock": llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
    "dio": llama_cpp.LLAMA_LOAD_MODE_DIRECT_IO,
}


class InPlaceModel(internals.LlamaModel):
    """A LlamaModel whose weights are read, and mapped, from `location` (a file or a region of one)."""

    def __init__(
        self, location: ModelLocation, gpu_layers: int, verbose: bool, gpu_devices: tuple[int, ...] = (), no_alloc: bool = False,
        load_mode: str = "auto", tensor_split: tuple[float, ...] = (),
    ) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers if gpu_devices else 0
        # Always an explicit list: llama.cpp would otherwise use every GPU registered, of any backend.
        self._devices = DeviceList(list(gpu_devices))
        params.devices = self._devices.address
        # Each device's share of the layers, in the order of gpu_devices; none: llama.cpp's, by free memory.
        self._split = (ctypes.c_float * llama_cpp.llama_max_devices())(*tensor_split[: llama_cpp.llama_max_devices()])
        if tensor_split:
            params.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
        params.no_alloc = no_alloc
        params.load_mode = LOAD_MODES[load_mode]
        if no_alloc:  # nothing is read or mapped; llama.cpp asserts that a no-alloc load does not map either
            params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        self.path_model, self.params, self.verbose = str(location.path), params, verbose
        self._exit_stack = contextlib.ExitStack()
        self.sampler = None
        self.custom_samplers: list[Any] = []
        self.model = None

        fp = _libc.open(str(location.path))
        if not fp:
            raise ValueError(f"cannot open {location.path}")
        self._exit_stack.callback(_libc.close, fp)
        model = None
        if _libc.seek(fp, location.offset):
            with quiet(verbose):
                model = llama_cpp.llama_model_load_from_file_ptr(fp, params)
        if model is None:
            self._exit_stack.close()
            raise ValueError("not a model llama.cpp can read")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)

        def free_model() -> None:
            if self.model is not None:
                llama_cpp.llama_model_free(self.model)
                self.model = None

        self._exit_stack.callback(free_model)


def model_facts(location: ModelLocation, cache_type_k: str = "f16", cache_type_v: str = "f16") -> ModelFacts:
    """What placing the model needs to know, read by llama.cpp without allocating or mapping the weights."""
    try:
        model = InPlaceModel(location, 0, verbose=False, no_alloc=True)
    except ValueError as exc:
        raise ModelFileError(f"llama.cpp could not read the model in {location.path} ({exc})") from None
    try:
        raw = model.model
        return ModelFacts(
            n_layer=llama_cpp.llama_model_n_layer(raw),
            weights_bytes=llama_cpp.llama_model_size(raw),
            kv_bytes_per_token=kv_bytes_per_token(model.metadata(), cache_type_k, cache_type_v),
            n_vocab=llama_cpp.llama_vocab_n_tokens(model.vocab),
            n_embd=llama_cpp.llama_model_n_embd(raw),
            n_ctx_train=llama_cpp.llama_model_n_ctx_train(raw),
        )
    finally:
        model.close()

"""Loading the weights in place: from a whole GGUF file, or from the region of a bundle that holds one.

llama.cpp can load a model from an open FILE* positioned at the GGUF (llama_model_load_from_file_ptr)
and then memory-maps the weights straight from that file, so a bundle's model is never copied.
llama-cpp-python's LlamaModel only loads from a path; this subclass, the one reach into its private
module, loads from a file region and keeps the FILE open as long as the model lives.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any

import llama_cpp
import llama_cpp._internals as internals
from llama_cpp._utils import suppress_stdout_stderr

from runtime.model_source import ModelLocation

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.fopen.argtypes, _libc.fopen.restype = [ctypes.c_char_p, ctypes.c_char_p], ctypes.c_void_p
_libc.fseeko.argtypes, _libc.fseeko.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int
_libc.fclose.argtypes, _libc.fclose.restype = [ctypes.c_void_p], ctypes.c_int
_SEEK_SET = 0

# The private shape this module relies on: checked at import, so a llama-cpp-python upgrade that
# changes it fails loudly here rather than deep inside a load.
assert {"model", "vocab", "tokenize", "token_to_piece", "metadata"} <= set(dir(internals.LlamaModel)) | {"model", "vocab"}


class InPlaceModel(internals.LlamaModel):
    """A LlamaModel whose weights are read, and mapped, from `location` (a file or a region of one)."""

    def __init__(self, location: ModelLocation, gpu_layers: int, verbose: bool) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        self.path_model, self.params, self.verbose = str(location.path), params, verbose
        self._exit_stack = contextlib.ExitStack()
        self.sampler = None
        self.custom_samplers: list[Any] = []
        self.model = None

        fp = _libc.fopen(str(location.path).encode(), b"rb")
        if not fp:
            raise ValueError(f"cannot open {location.path}")
        self._exit_stack.callback(_libc.fclose, fp)
        model = None
        if _libc.fseeko(fp, location.offset, _SEEK_SET) == 0:
            with suppress_stdout_stderr(disable=verbose):
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

"""Check that a file is a GGUF llama.cpp can read, and summarise its metadata for the manifest.

This uses llama.cpp's own GGUF parser (`gguf_init_from_file` in libggml-base, shipped with
llama-cpp-python) through ctypes, so that the bundler accepts exactly what the runtime will
load. The `gguf` Python package would also do, but it parses every tokenizer array into numpy
objects: 3 s for SmolLM2's 49k-token vocabulary, against a few milliseconds here, which would
make `llamabox build` far slower than copying the model.
"""

from __future__ import annotations

import ctypes
import importlib.util
import struct
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from runtime.errors import ModelFileError
from runtime.ggml_log import captured_log

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

_GGUF_TYPE_STRING = 8
_GGUF_INT_GETTERS = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 10: "u64", 11: "i64"}
_GGML_MAX_DIMS = 4


class InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@dataclass(frozen=True)
class GGUFInfo:
    """What the manifest records about a model."""

    gguf_version: int
    architecture: str | None
    name: str | None
    parameter_count: int
    context_length: int | None
    has_chat_template: bool
    license: str | None
    size_label: str | None
    # A part of a split model (NAME-00001-of-00003.gguf) says which part it is (from 0) and how many there are.
    split_no: int = 0
    split_count: int = 1
    general_type: str | None = None  # "adapter" for a LoRA adapter; a model says "model" or nothing
    pooling_type: int | None = None  # llama.cpp's: 4 (rank) for a reranker

    def as_metadata(self) -> dict[str, Any]:
        return {
            "gguf_version": self.gguf_version,
            "architecture": self.architecture,
            "name": self.name,
            "parameter_count": self.parameter_count,
            "context_length": self.context_length,
            "chat_template": self.has_chat_template,
            "license": self.license,
            "size_label": self.size_label,
        }


def read_gguf_info(path: Path) -> GGUFInfo:
    """Validate `path` as a complete GGUF file and summarise it; ModelFileError if it is not one."""
    try:
        with open(path, "rb") as f:
            header = f.read(8)
            file_size = f.seek(0, 2)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path} is a directory, not a GGUF model file") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from None

    if header[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path.name} is not a GGUF model file (it does not start with 'GGUF')")
    if len(header) < 8:
        raise ModelFileError(f"{path.name} is truncated: it ends inside the GGUF header; download it again")
    (version,) = struct.unpack("<I", header[4:8])
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path.name} is GGUF version {version}; llamabox reads versions 2 and 3")

    lib = _ggml_base()
    with captured_log(lib) as messages:
        ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(no_alloc=True, ctx=None))
    if not ctx:
        detail = messages[-1].strip() if messages else "unreadable header"
        raise ModelFileError(f"{path.name} is not a valid GGUF file ({detail}); is it damaged or incomplete?")
    try:
        data_end = _tensor_data_end(lib, ctx)
        if data_end > file_size:
            raise ModelFileError(
                f"{path.name} is truncated: its tensors need {data_end:,} bytes but the file has "
                f"{file_size:,}; download it again"
            )
        return summarise(lib, ctx, version)
    finally:
        lib.gguf_free(ctx)


def _tensor_data_end(lib: ctypes.CDLL, ctx: int) -> int:
    data_offset = lib.gguf_get_data_offset(ctx)
    ends = [
        lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i)
        for i in range(lib.gguf_get_n_tensors(ctx))
    ]
    return data_offset + max(ends, default=0)


def summarise(lib: ctypes.CDLL, ctx: int, version: int) -> GGUFInfo:
    """The summary of an open gguf_context (read from a file, or built in memory)."""
    architecture = _get(lib, ctx, "general.architecture")
    parameter_count = _get(lib, ctx, "general.parameter_count")
    if not isinstance(parameter_count, int):
        parameter_count = sum(_tensor_elements(lib, ctx, i) for i in range(lib.gguf_get_n_tensors(ctx)))
    context_length = _get(lib, ctx, f"{architecture}.context_length") if architecture else None
    return GGUFInfo(
        gguf_version=version,
        architecture=architecture,
        name=_get(lib, ctx, "general.name"),
        parameter_count=parameter_count,
        context_length=context_length if isinstance(context_length, int) else None,
        has_chat_template=lib.gguf_find_key(ctx, b"tokenizer.chat_template") >= 0,
        license=_get(lib, ctx, "general.license"),
        size_label=_get(lib, ctx, "general.size_label"),
        split_no=_int(_get(lib, ctx, "split.no"), 0),
        split_count=_int(_get(lib, ctx, "split.count"), 1),
        general_type=_get(lib, ctx, "general.type"),
        pooling_type=_int(_get(lib, ctx, f"{architecture}.pooling_type"), -1) if architecture else None,
    )


def _int(value: str | int | None, default: int) -> int:
    return value if isinstance(value, int) else default


def get_value(lib: ctypes.CDLL, ctx: int, key: str) -> str | int | None:
    """A string or integer value of an open gguf_context, or None when the key is absent or of another type."""
    return _get(lib, ctx, key)


def _get(lib: ctypes.CDLL, ctx: int, key: str) -> str | int | None:
    """A string or integer value, or None when the key is absent or of another type."""
    key_id = lib.gguf_find_key(ctx, key.encode())
    if key_id < 0:
        return None
    kind = lib.gguf_get_kv_type(ctx, key_id)
    if kind == _GGUF_TYPE_STRING:
        return lib.gguf_get_val_str(ctx, key_id).decode("utf-8", "replace")
    if kind in _GGUF_INT_GETTERS:
        return int(getattr(lib, f"gguf_get_val_{_GGUF_INT_GETTERS[kind]}")(ctx, key_id))
    return None


def _tensor_elements(lib: ctypes.CDLL, ctx: int, tensor_id: int) -> int:
    ne = lib.gguf_get_tensor_ne(ctx, tensor_id)
    count = 1
    for dim in range(_GGML_MAX_DIMS):
        count *= ne[dim]
    return count


def _ggml_library_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ModelFileError("llama-cpp-python is not installed; run scripts/setup.sh")
    return Path(spec.origin).parent / "lib"


def ggml_base() -> ctypes.CDLL:
    """libggml-base from llama-cpp-python, with the signatures of the GGUF functions the bundler calls."""
    return _ggml_base()


@cache
def _ggml_base() -> ctypes.CDLL:
    names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    lib = ctypes.CDLL(str(_ggml_library_dir() / names.get(sys.platform, "libggml-base.so")))
    c_ctx, i64, size_t = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    signatures: dict[str, tuple[list[Any], Any]] = {
        "gguf_init_from_file": ([ctypes.c_char_p, InitParams], c_ctx),
        "gguf_free": ([c_ctx], None),
        "gguf_get_data_offset": ([c_ctx], size_t),
        "gguf_get_n_tensors": ([c_ctx], i64),
        "gguf_get_tensor_offset": ([c_ctx, i64], size_t),
        "gguf_get_tensor_size": ([c_ctx, i64], size_t),
        "gguf_get_tensor_ne": ([c_ctx, i64], ctypes.POINTER(i64)),
        "gguf_find_key": ([c_ctx, ctypes.c_char_p], i64),
        "gguf_get_kv_type": ([c_ctx, i64], ctypes.c_int),
        "gguf_get_val_str": ([c_ctx, i64], ctypes.c_char_p),
        "gguf_get_val_u8": ([c_ctx, i64], ctypes.c_uint8),
        "gguf_get_val_i8": ([c_ctx, i64], ctypes.c_int8),
        "gguf_get_val_u16": ([c_ctx, i64], ctypes.c_uint16),
        "gguf_get_val_i16": ([c_ctx, i64], ctypes.c_int16),
        "gguf_get_val_u32": ([c_ctx, i64], ctypes.c_uint32),
        "gguf_get_val_i32": ([c_ctx, i64], ctypes.c_int32),
        "gguf_get_val_u64": ([c_ctx, i64], ctypes.c_uint64),
        "gguf_get_val_i64": ([c_ctx, i64], ctypes.c_int64),
        # Merging the parts of a split model (bundler/splits.py).
        "gguf_init_empty": ([], c_ctx),
        "gguf_get_version": ([c_ctx], ctypes.c_uint32),
        "gguf_get_alignment": ([c_ctx], size_t),
        "gguf_get_tensor_name": ([c_ctx, i64], ctypes.c_char_p),
        "gguf_find_tensor": ([c_ctx, ctypes.c_char_p], i64),
        "gguf_set_kv": ([c_ctx, c_ctx], None),
        "gguf_remove_key": ([c_ctx, ctypes.c_char_p], i64),
        "gguf_add_tensor": ([c_ctx, ctypes.c_void_p], None),
        "gguf_get_meta_size": ([c_ctx], size_t),
        "gguf_get_meta_data": ([c_ctx, ctypes.c_void_p], None),
        "ggml_get_tensor": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        "ggml_free": ([ctypes.c_void_p], None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib

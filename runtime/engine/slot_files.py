"""A slot's cache saved to a file and restored from it (llama-server's POST /slots/{id}?action=save|restore|erase,
with --slot-save-path): llama.cpp's own sequence state files, which hold the cached tokens and their keys and values,
so a long prompt read once can be put back later, or into another server of the same model.

The scheduler runs these on its own thread while the slot is idle (Scheduler.on_idle_slot): they touch the context.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from runtime.errors import LlamaboxError

# What llama.cpp's fs_validate_filename refuses in a name: a path, a control character, a character Windows forbids.
_FORBIDDEN = set('/\\:*?"<>|') | {chr(c) for c in range(32)} | {"\x7f"}


class SlotFileError(LlamaboxError):
    """A save or restore that cannot be done (a bad name, a file that is not a saved slot, no room)."""


@dataclass(frozen=True)
class SlotFile:
    """What a save or restore did: the tokens and the bytes, and how long it took."""

    tokens: int
    bytes: int
    ms: float


def valid_filename(name: str) -> bool:
    """Whether `name` is a plain file name that stays inside the save folder, as llama-server checks it."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= 255
        and not _FORBIDDEN & set(name)
        and name not in (".", "..")
        and name == name.strip(" ")
        and not name.endswith(".")
    )


def save(context: object, seq: int, tokens: list[int], path: Path) -> SlotFile:
    started = time.perf_counter()
    array = (llama_cpp.llama_token * max(1, len(tokens)))(*tokens)
    written = llama_cpp.llama_state_seq_save_file(context, os.fsencode(path), seq, array, len(tokens))
    if written == 0:
        raise SlotFileError(f"Unable to save slot to {path.name}")
    return SlotFile(len(tokens), written, (time.perf_counter() - started) * 1000)


def restore(context: object, seq: int, path: Path, capacity: int, n_vocab: int) -> tuple[list[int], SlotFile]:
    """The tokens of the slot state in `path`, whose keys and values are now sequence `seq`'s (emptied first)."""
    started = time.perf_counter()
    if not path.is_file():
        raise SlotFileError(f"Unable to restore slot: there is no saved slot {path.name}")
    memory = llama_cpp.llama_get_memory(context)
    llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
    array, count = (llama_cpp.llama_token * capacity)(), ctypes.c_size_t(0)
    read = llama_cpp.llama_state_seq_load_file(context, os.fsencode(path), seq, array, capacity, ctypes.byref(count))
    tokens = list(array[: count.value])
    if read == 0 or any(not 0 <= t < n_vocab for t in tokens):
        llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        raise SlotFileError(
            "Unable to restore slot: no room in the cache, or not a slot saved by this model "
            f"(at most {capacity} tokens fit)"
        )
    return tokens, SlotFile(len(tokens), read, (time.perf_counter() - started) * 1000)

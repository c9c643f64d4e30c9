"""How many slots the machine's memory allows by default: each slot has its own KV cache.

llama.cpp sizes the cache only when a context is made; the figure is needed before, so it is
worked out from the model's metadata (layers, key/value heads and their width, 16-bit cells), as
Ollama does for its default OLLAMA_NUM_PARALLEL.
"""

from __future__ import annotations

import os

DEFAULT_PARALLEL = 4
MEMORY_SHARE = 0.25  # of the memory available at start that the slots' caches may take by default


def kv_bytes_per_token(metadata: dict[str, str]) -> int:
    """Bytes of keys and values one token takes in the cache (F16), from GGUF metadata; 0 if unknown."""
    arch = metadata.get("general.architecture", "")

    def number(key: str) -> int:
        try:
            return int(metadata.get(f"{arch}.{key}", "0"))
        except ValueError:
            return 0  # per-layer arrays and the like: not a single number

    layers, heads, heads_kv, width = number("block_count"), number("attention.head_count"), number("attention.head_count_kv"), number("embedding_length")
    if not (layers and heads and width):
        return 0
    key_width = number("attention.key_length") or width // heads
    value_width = number("attention.value_length") or width // heads
    return layers * (heads_kv or heads) * (key_width + value_width) * 2


def auto_parallel(bytes_per_token: int, ctx_per_slot: int, available: int | None) -> int:
    """DEFAULT_PARALLEL slots, fewer (down to 1) where their caches would take more than MEMORY_SHARE."""
    if not bytes_per_token or not available:
        return DEFAULT_PARALLEL
    fits = int(available * MEMORY_SHARE // (bytes_per_token * ctx_per_slot))
    return max(1, min(DEFAULT_PARALLEL, fits))


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

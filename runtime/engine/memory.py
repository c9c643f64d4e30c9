"""What one token takes in the KV cache, before llama.cpp makes it.

llama.cpp sizes the cache only when a context is made; the figure is needed before (runtime/cache_plan.py
sizes the default cache by it, runtime/devices/offload.py fits the GPU by it), so it is worked out from the
model's metadata (layers, key/value heads and their width) and the cache's types (16-bit cells unless
--cache-type-k/-v say otherwise), as Ollama sizes its caches before it loads a model.
"""

from __future__ import annotations

import llama_cpp

from runtime.cache_types import CACHE_TYPES
from runtime.devices import ggml

# --cache-type-k and --cache-type-v as ggml's types. A quantized V cache needs flash attention, which llama.cpp
# turns on by itself where the backend has it.
GGML_CACHE_TYPES = {name: getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") for name in CACHE_TYPES}

def kv_bytes_per_token(metadata: dict[str, str], type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of keys and values one token takes in the cache, from GGUF metadata; 0 if unknown."""
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
    return layers * (heads_kv or heads) * (_row_bytes(type_k, key_width) + _row_bytes(type_v, value_width))


def _row_bytes(cache_type: str, width: int) -> int:
    """What one head's keys (or values) of one token take in a cache of this type, as ggml stores them (asked for
    256 values, a whole number of blocks of every type: ggml aborts on a width its blocks do not divide)."""
    return -(-ggml.row_size(GGML_CACHE_TYPES[cache_type], 256) * width // 256)

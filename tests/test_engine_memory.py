"""The default number of slots: four, fewer where their caches would not fit comfortably."""

from __future__ import annotations

from runtime.engine.memory import auto_parallel, kv_bytes_per_token

# SmolLM2-135M's shape: 30 layers, 9 heads of 64, 3 key/value heads.
SMOLLM2 = {"general.architecture": "llama", "llama.block_count": "30", "llama.attention.head_count": "9",
           "llama.attention.head_count_kv": "3", "llama.embedding_length": "576"}
GIB = 2**30


def test_kv_bytes_per_token_from_metadata() -> None:
    assert kv_bytes_per_token(SMOLLM2) == 30 * 3 * (64 + 64) * 2  # 23,040 bytes
    assert kv_bytes_per_token({"general.architecture": "llama"}) == 0  # unknown: no guess
    # Quantized caches, as ggml stores them: q8_0 keeps 32 values in 34 bytes, q4_0 in 18.
    assert kv_bytes_per_token(SMOLLM2, "q8_0", "q8_0") == 30 * 3 * (64 + 64) * 34 // 32
    assert kv_bytes_per_token(SMOLLM2, "q8_0", "q4_0") == 30 * 3 * 64 * (34 + 18) // 32


def test_four_slots_where_memory_allows_fewer_where_not() -> None:
    llama_8b = 32 * 8 * (128 + 128) * 2  # 128 KiB per token
    assert auto_parallel(kv_bytes_per_token(SMOLLM2), 4096, 8 * GIB) == 4
    assert auto_parallel(llama_8b, 4096, 16 * GIB) == 4  # 2 GiB of cache within a quarter of 16 GiB
    assert auto_parallel(llama_8b, 4096, 4 * GIB) == 2
    assert auto_parallel(llama_8b, 4096, 1 * GIB) == 1  # never fewer than one
    assert auto_parallel(0, 4096, 1 * GIB) == 4 and auto_parallel(llama_8b, 4096, None) == 4  # unknown: the default

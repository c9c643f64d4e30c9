"""The default cache: the model's own context shared by four slots, shorter where memory is short; with
--ctx-per-slot, four parts, fewer where they would not fit comfortably."""

from __future__ import annotations

from runtime.cache_plan import CachePlan, auto_context, auto_parallel, plan_cache
from runtime.engine.memory import kv_bytes_per_token

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


def test_the_default_context_is_the_models_own_cut_by_memory_not_below_4096() -> None:
    llama_8b = 32 * 8 * (128 + 128) * 2  # 128 KiB per token, 131,072 tokens trained
    assert auto_context(kv_bytes_per_token(SMOLLM2), 8192, 8 * GIB) == 8192  # 180 MiB: the model's own
    assert auto_context(llama_8b, 131072, 64 * GIB) == 131072  # 16 GiB within a quarter of 64 GiB
    assert auto_context(llama_8b, 131072, 16 * GIB) == 32768  # a quarter of 16 GiB holds 32,768 tokens
    assert auto_context(llama_8b, 131072, 1 * GIB) == 4096  # not below llama-server's --fit-ctx
    assert auto_context(llama_8b, 2048, 1 * GIB) == 2048  # nor above the model's own
    assert auto_context(0, 131072, 64 * GIB) == 4096 and auto_context(llama_8b, 131072, None) == 4096  # unknown: 4096


def test_a_shared_cache_or_a_part_for_each_slot() -> None:
    assert plan_cache(4096, False, None, 1000, 8192) == CachePlan(4096, 4, shared=True)
    assert plan_cache(0, False, 2, 1000, 8192) == CachePlan(8192, 2, shared=True)
    per_slot = plan_cache(4096, True, 3, 1000, 8192)
    assert per_slot == CachePlan(12288, 3, shared=False) and per_slot.per_request == 4096
    assert plan_cache(None, True, 2, 1000, 131072) == CachePlan(8192, 2, shared=False)  # 4096 a slot by default
    assert CachePlan(8192, 4, shared=True).per_request == 8192

"""The KV cache types llama-server's --cache-type-k and --cache-type-v take, by name: here, apart from the
engine, so that the command line can offer them without loading llama.cpp (engine/memory.py maps them to ggml's
types)."""

CACHE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
UNQUANTIZED = ("f32", "f16")  # a V cache of any other type needs flash attention

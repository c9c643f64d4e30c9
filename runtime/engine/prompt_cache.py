"""Prompts parked in memory: the keys and values of idle slots, taken out of a shared KV cache and put back in a
slot when a request continues one (the next turn of a chat).

In one shared cache every request attends over every occupied cell, so the cached prompts of idle slots slow
down the requests running beside them (here 1,000 idle tokens cost SmolLM2 a third of its decoding speed).
llama-server, with its default unified cache, saves idle slots to host memory and clears them when a new request
starts (`--cache-ram`, `--cache-idle-slots`); the scheduler does the same with this cache, through llama.cpp's
own sequence state functions (llama_state_seq_get_data / llama_state_seq_set_data).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

from runtime.cache_plan import available_memory

LIMIT_BYTES = 8 << 30  # llama-server's --cache-ram default (8192 MiB)


def default_limit(cache_bytes: int) -> int:
    """As much memory as the KV cache itself takes (`cache_bytes`), at most LIMIT_BYTES or a quarter of the memory
    available at start: parked prompts may double the cache's memory, never more."""
    available = available_memory()
    return min(cache_bytes or LIMIT_BYTES, LIMIT_BYTES, available // 4 if available else LIMIT_BYTES)


@dataclass
class Parked:
    tokens: list[int]
    state: ctypes.Array[ctypes.c_uint8]
    lora: tuple[float, ...] = ()  # the LoRA scales its keys and values were computed with


class PromptCache:
    def __init__(self, context: object, limit_bytes: int) -> None:
        self._context, self._limit = context, limit_bytes
        self._parked: list[Parked] = []  # oldest first

    def park(self, seq_id: int, tokens: list[int], lora: tuple[float, ...] = ()) -> None:
        """Keep sequence `seq_id`'s keys and values (for `tokens`, computed with the LoRA scales `lora`) here; the
        caller then clears it from the cache."""
        size = llama_cpp.llama_state_seq_get_size(self._context, seq_id)
        if not tokens or size > self._limit:
            return
        state = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._context, state, size, seq_id) != size:
            return
        # A parked prompt that this one continues is superseded by it.
        self._parked = [p for p in self._parked if p.lora != lora or p.tokens != tokens[: len(p.tokens)]]
        self._parked.append(Parked(list(tokens), state, lora))
        while sum(len(p.state) for p in self._parked) > self._limit:
            self._parked.pop(0)

    def best(self, tokens: list[int], lora: tuple[float, ...] = ()) -> tuple[Parked | None, int]:
        """The parked prompt computed with the LoRA scales `lora` sharing the longest start with `tokens`, and how many
        tokens they share."""
        found, shared = None, 0
        for parked in self._parked:
            n = common_prefix(parked.tokens, tokens) if parked.lora == lora else 0
            if n > shared:
                found, shared = parked, n
        return found, shared

    def restore(self, parked: Parked, seq_id: int) -> bool:
        """Put `parked` back as sequence `seq_id` (which must be empty); False where llama.cpp could not."""
        self._parked.remove(parked)
        return llama_cpp.llama_state_seq_set_data(self._context, parked.state, len(parked.state), seq_id) != 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

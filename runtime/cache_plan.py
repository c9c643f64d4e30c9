"""The KV cache the engine makes: how many cells, for how many slots, shared by them or split.

By default one cache is shared by the slots (llama-server's default, `-np auto` with `kv_unified`): any one
request may use all of it, and `--ctx-size` is its total. Its default size is the model's own context (as
llama-server's `-c 0`), cut to what a quarter of the memory free at start holds but not below 4096 tokens (as
llama-server's `--fit` with its `--fit-ctx`). `--ctx-per-slot` gives each slot its own `--ctx-size` cells
instead, and then takes fewer slots where their parts would not fit that quarter (as Ollama's
OLLAMA_NUM_PARALLEL). Apart from the engine, so that `--info` and the GPU's fit use it without llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_PARALLEL = 4
MEMORY_SHARE = 0.25  # of the memory available at start that the cache may take by default
MIN_AUTO_CONTEXT = 4096  # llama-server's --fit-ctx: the default context is not cut below this for memory
CELL_ROUNDING = 256


@dataclass(frozen=True)
class CachePlan:
    """`cells` tokens of cache for `parallel` slots, shared by them or split into equal parts."""

    cells: int
    parallel: int
    shared: bool

    @property
    def per_request(self) -> int:
        """The tokens of context one request may use."""
        return self.cells if self.shared else self.cells // self.parallel


def plan_cache(ctx_size: int | None, per_slot: bool, parallel: int | None, bytes_per_token: int, n_ctx_train: int) -> CachePlan:
    """The cache for --ctx-size (0: the model's own), --ctx-per-slot and --parallel. By default: auto_context shared
    by DEFAULT_PARALLEL slots; with --ctx-per-slot, MIN_AUTO_CONTEXT tokens a slot for DEFAULT_PARALLEL slots, fewer
    where their parts would take too much memory."""
    available = available_memory()
    if not per_slot:
        ctx = (ctx_size or n_ctx_train) if ctx_size is not None else auto_context(bytes_per_token, n_ctx_train, available)
        return CachePlan(ctx, parallel or DEFAULT_PARALLEL, shared=True)
    part = (ctx_size or n_ctx_train) if ctx_size is not None else min(MIN_AUTO_CONTEXT, n_ctx_train)
    slots = parallel or auto_parallel(bytes_per_token, part, available)
    return CachePlan(part * slots, slots, shared=False)


def auto_parallel(bytes_per_token: int, ctx_per_slot: int, available: int | None) -> int:
    """DEFAULT_PARALLEL slots, fewer (down to 1) where their caches would take more than MEMORY_SHARE."""
    if not bytes_per_token or not available:
        return DEFAULT_PARALLEL
    fits = int(available * MEMORY_SHARE // (bytes_per_token * ctx_per_slot))
    return max(1, min(DEFAULT_PARALLEL, fits))


def auto_context(bytes_per_token: int, n_ctx_train: int, available: int | None) -> int:
    """The default context: the model's own (as llama-server's -c 0), cut to what MEMORY_SHARE of the available
    memory holds, but not below MIN_AUTO_CONTEXT (nor above the model's own); MIN_AUTO_CONTEXT where either size
    is unknown (a model's 131,072 tokens could take 16 GiB)."""
    if not bytes_per_token or not available:
        return min(n_ctx_train, MIN_AUTO_CONTEXT)
    fits = int(available * MEMORY_SHARE // bytes_per_token) // CELL_ROUNDING * CELL_ROUNDING
    return min(n_ctx_train, max(fits, MIN_AUTO_CONTEXT))


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

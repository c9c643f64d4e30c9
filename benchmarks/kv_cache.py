"""The KV cache's memory per token at each cache type (-ctk/-ctv), as llama.cpp stores it, against what the runtime
plans with (runtime/engine/memory.py, which sizes the default context and --parallel).

    python benchmarks/kv_cache.py [--model M.gguf]

Measured with llama.cpp's own state API: a sequence's saved state (llama_state_seq_get_size) after reading 256
and after 768 tokens; the difference over 512 tokens is what each token takes in the cache, K and V of every layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bundler.default_model import default_model_path  # noqa: E402
from runtime.devices import cpu as backends  # noqa: E402
from runtime.engine import Engine, EngineOptions, Sampling  # noqa: E402
from runtime.engine.memory import kv_bytes_per_token  # noqa: E402
from runtime.model_source import ModelLocation  # noqa: E402

TYPES = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0")]


def state_bytes(engine: Engine, tokens: int) -> int:
    """The saved state of a sequence that read `tokens` tokens of prompt."""
    prompt = engine.text_prompt("Hello there. " * tokens)
    engine.complete(type(prompt)(tokens=prompt.tokens[:tokens]), Sampling(temperature=0, max_tokens=1))
    return llama_cpp.llama_state_seq_get_size(engine._context, 0)  # noqa: SLF001 - a measurement of llama.cpp's own state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    model = (args.model or default_model_path()).resolve()
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)
    print(f"{model.name}\n")
    print("| -ctk | -ctv | bytes per token, measured | planned (memory.py) | of f16 |")
    print("|---|---|---|---|---|")
    f16 = None
    for k, v in TYPES:
        options = EngineOptions(ctx_size=1024, parallel=1, threads=2, cache_type_k=k, cache_type_v=v)
        with Engine(ModelLocation(model), options) as engine:
            per_token = (state_bytes(engine, 768) - state_bytes(engine, 256)) // 512
            planned = kv_bytes_per_token(engine.metadata, k, v)
        f16 = f16 or per_token
        print(f"| {k} | {v} | {per_token:,} | {planned:,} | {per_token / f16:.0%} |")


if __name__ == "__main__":
    main()

"""Prompt and generation speed of the runtime's CPU variants against a native llama-bench, in one run.

    python benchmarks/cpu_variants.py MODEL.gguf --variants sapphirerapids,icelake --threads 8

Each variant runs in its own child process (the kernel self-test's fork, runtime/devices/proof/child.py)
through llama-cpp-python's low-level bindings, the libraries the stub ships, measuring what
llama-bench measures: pp512 (one 512-token batch) and tg128 (128 single-token steps), `--reps` times
each. The native llama-bench (benchmarks/native.py builds it with GGML_NATIVE=ON and the same patches)
runs the same model with the same threads. Prints a Markdown table naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import openblas  # noqa: E402

openblas.keep_idle()

import llama_cpp  # noqa: E402

from runtime import packaged  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402
from runtime.devices.proof import child  # noqa: E402

PROMPT_TOKENS, GENERATED_TOKENS = 512, 128


def measure(model: Path, threads: int, reps: int) -> dict[str, list[float]]:
    """pp512 and tg128 in tokens per second, `reps` samples each, with the CPU backend registered here."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    loaded = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = PROMPT_TOKENS + GENERATED_TOKENS + 16
    context_params.n_batch = context_params.n_ubatch = PROMPT_TOKENS
    context_params.n_threads = context_params.n_threads_batch = threads
    context = llama_cpp.llama_init_from_model(loaded, context_params)
    memory = llama_cpp.llama_get_memory(context)
    batch = llama_cpp.llama_batch_init(PROMPT_TOKENS, 0, 1)

    def decode(tokens: list[int], first: int) -> None:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, first + i, 1, i == len(tokens) - 1
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(context, batch) == 0

    tokens = [(i * 7919) % 1000 + 10 for i in range(PROMPT_TOKENS)]
    samples: dict[str, list[float]] = {"pp512": [], "tg128": []}
    decode(tokens[:16], 0)  # warm-up, as llama-bench does
    for _ in range(reps):
        llama_cpp.llama_memory_clear(memory, True)
        started = time.perf_counter()
        decode(tokens, 0)
        samples["pp512"].append(PROMPT_TOKENS / (time.perf_counter() - started))
        llama_cpp.llama_memory_clear(memory, True)
        started = time.perf_counter()
        for i in range(GENERATED_TOKENS):
            decode([tokens[i]], i)
        samples["tg128"].append(GENERATED_TOKENS / (time.perf_counter() - started))
    return samples


def native(llama_bench: Path, model: Path, threads: int, reps: int) -> dict[str, list[float]]:
    result = subprocess.run(
        [str(llama_bench), "-m", str(model), "-p", str(PROMPT_TOKENS), "-n", str(GENERATED_TOKENS), "-t", str(threads),
         "-r", str(reps), "-o", "json"],
        capture_output=True, text=True, check=True,
    )
    samples: dict[str, list[float]] = {}
    for test in json.loads(result.stdout):
        name = "pp512" if test["n_prompt"] else "tg128"
        samples[name] = list(test["samples_ts"])
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--variants", default="sapphirerapids,icelake")
    parser.add_argument("--llama-bench", type=Path, help="the native llama-bench to compare with [default: build it with benchmarks/native.py]")
    parser.add_argument("--no-native", action="store_true", help="measure the runtime's variants only")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    rows: dict[str, dict[str, list[float]]] = {}
    for variant in args.variants.split(","):
        library = packaged.backend_dir() / f"libggml-cpu-{variant}.so"
        outcome = child.run_variant(variant, library, lambda: measure(args.model, args.threads, args.reps), 600)
        if outcome.result is None:
            sys.exit(f"{variant}: {outcome.failure}")
        rows[f"runtime, {variant} kernels"] = outcome.result
    if not args.no_native:
        from benchmarks.native import llama_bench

        rows["native llama-bench (GGML_NATIVE=ON)"] = native(args.llama_bench or llama_bench(), args.model, args.threads, args.reps)

    cpu = cpu_info()
    print(f"CPU: {cpu.name} ({' '.join(cpu.features)}); model {args.model.name}; {args.threads} threads; "
          f"median of {args.reps}, tokens per second\n")
    print("| kernels | pp512 | tg128 |")
    print("|---|---:|---:|")
    for name, samples in rows.items():
        print(f"| {name} | {statistics.median(samples['pp512']):.1f} | {statistics.median(samples['tg128']):.1f} |")


if __name__ == "__main__":
    main()

"""What the self-test computes in its child process: the proof model in every weight type, run by llama.cpp.

The weights are loaded the way a real model's are (memory-mapped, with ggml's extra buffer types,
so the weight repacking and AMX paths run), then an 8-token batch is evaluated (the matrix-matrix
kernels that prompts take) and one more token (the matrix-vector kernels that decoding takes).
The result is every logit of those 9 positions, per weight type.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from runtime.devices.ggml import DeviceList
from runtime.devices.proof.model import N_CTX, N_VOCAB

# Every weight type ggml's AMX kernels take (ggml-cpu/amx/common.h: qtype_has_amx_kernels, plus F16),
# which also covers the types that the AVX2/AVX-512 repacking takes (Q4_0, Q4_K, Q8_0).
WEIGHT_TYPES = {
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "IQ4_XS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
}
PROMPT = [3, 14, 15, 9, 26, 53, 58, 9]
NEXT_TOKEN = 7

Logits = list[float]


def model_paths(base: Path, directory: Path) -> dict[str, Path]:
    """Where the proof model is in each weight type: the F16 original, the others in `directory`."""
    return {name: base if name == "F16" else directory / f"proof-{name}.gguf" for name in WEIGHT_TYPES}


def quantize(base: Path, models: dict[str, Path]) -> None:
    """Write the F16 proof model in every other weight type (llama.cpp's own quantizer)."""
    for name, out in models.items():
        if out == base:
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = WEIGHT_TYPES[name]
        params.pure = True  # every matrix in this one type, the embeddings and output included
        if llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize the proof model to {name}")


def quantized_logits(base: Path, models: dict[str, Path], threads: int) -> dict[str, Logits]:
    """Write the proof model in every weight type, then their logits on the CPU: the self-test's reference."""
    quantize(base, models)
    return run(models, threads)


def run(models: dict[str, Path], threads: int, device: int | None = None) -> dict[str, Logits]:
    """Every weight type's logits: on the CPU backend registered in this process, or with every layer on
    ggml's device `device` (a GPU)."""
    llama_cpp.llama_backend_init()
    return {name: _logits(path, threads, device) for name, path in models.items()}


def _logits(path: Path, threads: int, device: int | None) -> Logits:
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0 if device is None else -1
    devices = DeviceList([] if device is None else [device])  # the CPU alone, or that GPU alone
    model_params.devices = devices.address
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path.name}")
    context = None
    batch = llama_cpp.llama_batch_init(len(PROMPT), 0, 1)
    try:
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = N_CTX
        context_params.n_threads = context_params.n_threads_batch = threads
        context = llama_cpp.llama_init_from_model(model, context_params)
        if not context:
            raise RuntimeError(f"llama.cpp could not make a context for {path.name}")
        logits: Logits = []
        for first, tokens in ((0, PROMPT), (len(PROMPT), [NEXT_TOKEN])):
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, first + i, 1, True
                batch.seq_id[i][0] = 0
            if llama_cpp.llama_decode(context, batch) != 0:
                raise RuntimeError(f"llama.cpp could not evaluate {path.name}")
            for i in range(len(tokens)):
                logits.extend(llama_cpp.llama_get_logits_ith(context, i)[:N_VOCAB])
        return logits
    finally:
        llama_cpp.llama_batch_free(batch)
        if context:
            llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)

"""llama.cpp's AMX kernels (the sapphirerapids variant), fixed by scripts/patches/0001.

The disassembly check runs on any x86-64 machine; the rest needs a CPU with AMX (Intel Xeon
Sapphire Rapids and newer) and is skipped elsewhere with the flags that are missing.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from runtime import packaged
from runtime.devices.cpu_features import cpu_info
from runtime.devices.proof import child

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX is x86-64")

AMX_FLAGS = ("AMX-INT8", "AVX-512-BF16", "AVX-512-VNNI")
AMX_LIBRARY = "libggml-cpu-sapphirerapids.so"
PROMPT = "The capital of France is"


def _missing_amx_flags() -> list[str]:
    return [flag for flag in AMX_FLAGS if flag not in cpu_info().features]


needs_amx = pytest.mark.skipif(bool(_missing_amx_flags()), reason=f"needs a CPU with AMX; this one lacks {', '.join(_missing_amx_flags())}")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_amx_tile_configuration_is_written_before_it_is_loaded() -> None:
    """Every `ldtilecfg X(%rsp)` is preceded by stores to the palette, colsb[] (X+16) and rows[] (X+48).

    Without the patch, the compiler kept only the zeroing of all 64 bytes and the palette id, and the
    first tile load raised #UD on every AMX machine (llama.cpp issue #20824). So the zeroing store
    (one that covers the whole configuration) does not count.
    """
    library = packaged.backend_dir() / AMX_LIBRARY
    lines = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True).stdout.splitlines()
    loads = [i for i, line in enumerate(lines) if "ldtilecfg" in line]
    assert loads, "no ldtilecfg in the sapphirerapids kernels: was it built with AMX?"
    for index in loads:
        base = int(re.search(r"ldtilecfg\s+(0x[0-9a-f]+|)\(%rsp\)", lines[index]).group(1) or "0", 16)
        written = set()
        for line in lines[max(0, index - 40):index]:
            store = re.search(r"\s(mov\w*|vmov\w*)\s+[^,]+,(0x[0-9a-f]+|)\(%rsp\)$", line)
            if store:
                offset = int(store.group(2) or "0", 16) - base
                width = 64 if "zmm" in line else 32 if "ymm" in line else 16 if "xmm" in line else 8
                if store.group(1) == "movb":
                    width = 1
                if not (offset <= 0 and offset + width >= 64):
                    written.update(range(offset, offset + width))
        assert {0, 16, 48} <= written, f"tile configuration at {lines[index].strip()} is not fully written first"


def _top_token(model: Path) -> int:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_threads=4, verbose=False)
    tokens = llm.tokenize(PROMPT.encode())
    llm.eval(tokens)
    scores = llm.scores[len(tokens) - 1]
    return int(scores.argmax())


def _top_token_with(variant: str, model: Path) -> int:
    outcome = child.run_variant(variant, packaged.backend_dir() / f"libggml-cpu-{variant}.so", lambda: {"top": [_top_token(model)]}, 300)
    assert outcome.result is not None, f"{variant}: {outcome.failure}"
    return int(outcome.result["top"][0])


@needs_amx
@pytest.mark.slow
@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "F16"])
def test_amx_weight_types_give_the_same_top_token_as_icelake(smollm2: Path, weight_type: str) -> None:
    import llama_cpp

    ftypes = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
              "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
              "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}
    with tempfile.TemporaryDirectory() as directory:
        model = Path(directory) / f"smollm2-{weight_type}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.pure = ftypes[weight_type], True, True
        assert llama_cpp.llama_model_quantize(str(smollm2).encode(), str(model).encode(), ctypes.byref(params)) == 0
        amx, reference = _top_token_with("sapphirerapids", model), _top_token_with("icelake", model)
    assert amx == reference


@needs_amx
@pytest.mark.slow
def test_bundle_answers_on_amx_without_choosing_a_variant(bundle: Path) -> None:
    info = subprocess.run([str(bundle), "--info"], capture_output=True, text=True, timeout=300)
    assert "CPU kernels self-test: sapphirerapids: proven on this CPU" in info.stdout, info.stdout + info.stderr
    answer = subprocess.run([str(bundle), "-p", "Write one sentence about cats.", "--temp", "0", "-n", "16"],
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr
    assert "cat" in answer.stdout.lower()

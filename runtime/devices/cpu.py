"""The CPU's kernels: llama.cpp's score of every CPU variant on this machine, and loading the chosen one.

The CPU kernels live in one library per instruction-set level (libggml-cpu-x64, -sse42, -sandybridge,
-haswell, -skylakex, ... on x86-64; -apple_m1, -apple_m2_m3, -apple_m4 on Apple Silicon). Each exports
llama.cpp's own `ggml_backend_score()`, which checks the running CPU and returns 0 when the variant cannot
run here, else a higher score for a better fit. We ask every variant for its score and register the chosen
one, so the choice is llama.cpp's, and we know (and can report) which it was.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime import packaged
from runtime.devices.ggml import load_module, module_file_name
from runtime.errors import BackendError

CPU_VARIANT_GLOB = module_file_name("cpu-*")


@dataclass(frozen=True)
class VariantScore:
    name: str
    path: Path
    score: int


@dataclass(frozen=True)
class CpuBackend:
    variant: str
    path: Path
    score: int
    runnable: tuple[str, ...]
    proof: str  # the kernel self-test's verdict, e.g. "haswell: proven on this CPU"
    warnings: tuple[str, ...] = ()


def variant_name(path: Path) -> str:
    prefix, suffix = CPU_VARIANT_GLOB.split("*")
    return path.name.removeprefix(prefix).removesuffix(suffix)


def forced_variant(scores: list[VariantScore], forced: str) -> VariantScore:
    """The variant named with --cpu-variant, if it exists and this CPU can run it."""
    by_name = {s.name: s for s in scores}
    if forced not in by_name:
        raise BackendError(f"unknown CPU variant {forced!r}; choose one of: {', '.join(s.name for s in scores)}")
    if by_name[forced].score <= 0:
        names = ", ".join(s.name for s in reversed(ranked(scores)))
        raise BackendError(f"this CPU cannot run the {forced!r} kernels (it lacks instructions they use); choose one of: {names}")
    return by_name[forced]


def variant_scores(directory: Path | None = None, expected: list[str] | None = None) -> tuple[list[VariantScore], list[str]]:
    """llama.cpp's score of every CPU variant in `directory`, and warnings about missing or unreadable ones.

    `expected`: the variants the stub was built with.
    """
    directory = directory or packaged.backend_dir()
    paths = sorted(directory.glob(CPU_VARIANT_GLOB))
    warnings = []
    missing = sorted(set(expected or []) - {variant_name(p) for p in paths})
    if missing:
        warnings.append(f"this runtime lacks the CPU kernels {', '.join(missing)} (damaged download?); using the best of the rest")
    if not paths:
        raise BackendError(f"no llama.cpp CPU libraries in {directory}; the runtime is damaged, download it again")
    return [VariantScore(variant_name(p), p, _score(p, warnings)) for p in paths], warnings


def ranked(scores: list[VariantScore]) -> list[VariantScore]:
    """The variants this CPU can run, best first (the portable one last)."""
    runnable = sorted((s for s in scores if s.score > 0), key=lambda s: s.score, reverse=True)
    if not runnable:
        raise BackendError("none of the llama.cpp CPU libraries can run on this CPU")
    return runnable


def load_cpu_backend(chosen: VariantScore, scores: list[VariantScore], warnings: list[str], proof: str, forced: bool) -> CpuBackend:
    """Register `chosen` with ggml; if it will not load (and was not forced), the portable variant."""
    runnable = tuple(s.name for s in reversed(ranked(scores)))
    if not load_module(chosen.path, warnings):
        portable = min((s for s in scores if s.score > 0 and s is not chosen), key=lambda s: s.score, default=None)
        if portable is None or forced or not load_module(portable.path, warnings):
            raise BackendError(f"llama.cpp could not load its CPU library {chosen.path.name}; " + "; ".join(warnings))
        warnings.append(f"falling back to the portable {portable.name} kernels")
        chosen = portable
    return CpuBackend(chosen.name, chosen.path, chosen.score, runnable, proof, tuple(warnings))


def register_cpu_variant(path: Path) -> None:
    """Register one CPU variant library with ggml (in the self-test's child process)."""
    warnings: list[str] = []
    if not load_module(path, warnings):
        raise BackendError(warnings[0])


def _score(path: Path, warnings: list[str]) -> int:
    """llama.cpp's score of a CPU variant on this machine; 0 if it cannot run here or is unreadable."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        warnings.append(f"cannot open {path.name} ({exc})")
        return 0
    try:
        score = getattr(lib, "ggml_backend_score", None)
        if score is None:
            return 0
        score.restype = ctypes.c_int
        return int(score())
    finally:
        if sys.platform != "win32":
            import _ctypes

            _ctypes.dlclose(lib._handle)


def default_threads() -> int:
    """Threads for generation: every core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)

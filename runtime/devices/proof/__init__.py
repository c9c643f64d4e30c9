"""Proving a CPU variant's kernels on this machine before serving with them.

A CPU's feature flags are not proof that a set of kernels runs on it: hypervisors, microcode and
compilers get in the way (the AMX kernels of llama.cpp, miscompiled, died with SIGILL on every
Sapphire Rapids; scripts/patches/0001). So before the model loads, the chosen variant runs a
small model (model.py) through the same paths the real one will take (workload.py), in a child
process (child.py), and its logits are compared with those of the portable kernels. A variant that
dies, hangs or answers differently is passed over for the next one in llama.cpp's score order,
down to the portable one. Verdicts are cached per CPU signature and runtime build (cache.py).
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from runtime import packaged
from runtime.devices.cpu import VariantScore
from runtime.errors import BackendError
from runtime.devices.proof import cache, child, workload

# Largest difference from the portable kernels' logits, relative to their largest magnitude, that
# still counts as the same answer. Kernels differ in summation order and in how they quantize
# activations; between the 13 variants an AMD EPYC (Zen 5) runs, the worst seen was 0.7 % (Q4_0).
# Broken kernels are off by tens of percent.
TOLERANCE = 0.03
TIMEOUT_S = 120.0  # the self-test takes well under a second; qemu's emulation is slower


@dataclass(frozen=True)
class Verdict:
    variant: VariantScore
    note: str  # for --info and /props: "haswell: proven on this CPU", "zen4 died with SIGILL in ...; using icelake"
    warning: str | None  # one line for stderr when a better variant was passed over


def choose(ranked: list[VariantScore], cpu_signature: str, threads: int, say: Callable[[str], None]) -> Verdict:
    """The best variant in `ranked` (best first, the portable one last) that passes the self-test."""
    portable = ranked[-1]
    if not child.available():
        return Verdict(ranked[0], f"{ranked[0].name}: not proven (the self-test needs a child process, which {sys.platform} cannot start)", None)
    verdicts = cache.VerdictCache(packaged.cache_dir() / "kernel-proofs.json")
    proof = _Proof(portable, threads)
    passed_over: list[str] = []
    try:
        for candidate in ranked[:-1]:
            key = cache.key(cpu_signature, candidate.name, candidate.path)
            verdict = verdicts.get(key)
            if verdict is None:
                say(f"checking the {candidate.name} CPU kernels on this CPU (once per CPU and runtime build)...")
                verdict = proof.test(candidate)
                if lasting(verdict):
                    verdicts.put(key, verdict)
            if verdict == cache.PROVEN:
                note = f"{candidate.name}: proven on this CPU"
                return _verdict(candidate, note, passed_over)
            passed_over.append(f"{candidate.name} {verdict}")
    finally:
        proof.close()
    return _verdict(portable, f"{portable.name}: the portable kernels, the self-test's reference", passed_over)


def lasting(verdict: str) -> bool:
    """Whether a verdict says something about the kernels on this machine, rather than about this moment
    (a hang on a swapping machine, a kill from outside, memory another program holds): only those are cached."""
    return verdict == cache.PROVEN or verdict.startswith(("gave wrong results", *(f"died with {s}" for s in child.CRASH_SIGNALS)))


def _verdict(chosen: VariantScore, note: str, passed_over: list[str]) -> Verdict:
    if not passed_over:
        return Verdict(chosen, note, None)
    line = f"{'; '.join(passed_over)} in the self-test; using {chosen.name}"
    return Verdict(chosen, line, line)


class _Proof:
    """The portable kernels' answer, computed once when first needed, and the comparison with it."""

    def __init__(self, portable: VariantScore, threads: int) -> None:
        self.portable, self.threads = portable, threads
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._models: dict[str, Path] = {}
        self._reference: dict[str, list[float]] | None = None

    def test(self, candidate: VariantScore) -> str:
        reference = self._reference_logits()
        outcome = child.run_variant(candidate.name, candidate.path, partial(workload.run, self._models, self.threads), TIMEOUT_S)
        if outcome.result is None:
            return str(outcome.failure)
        return judge(reference, outcome.result)

    def _reference_logits(self) -> dict[str, list[float]]:
        if self._reference is None:
            self._directory = tempfile.TemporaryDirectory(prefix="llamabox-proof-")
            base = packaged.proof_model(fallback=Path(self._directory.name))
            self._models = workload.model_paths(base, Path(self._directory.name))
            quantized_logits = partial(workload.quantized_logits, base, self._models, self.threads)
            outcome = child.run_variant(self.portable.name, self.portable.path, quantized_logits, TIMEOUT_S)
            if outcome.result is None:
                raise BackendError(
                    f"even the portable {self.portable.name} CPU kernels {outcome.failure} in their self-test; "
                    "the runtime cannot run on this machine (report it with the output of --info --cpu-variant x64)"
                )
            self._reference = outcome.result
        return self._reference

    def close(self) -> None:
        if self._directory is not None:
            self._directory.cleanup()


def judge(reference: dict[str, list[float]], result: dict[str, list[float]]) -> str:
    """PROVEN when every weight type's logits are the reference's within TOLERANCE, else which type was off and by how much."""
    worst_type, error = max(((name, relative_error(reference[name], result[name])) for name in reference), key=lambda e: e[1])
    if not error <= TOLERANCE:  # NaN, as broken kernels often give, fails too
        return f"gave wrong results ({worst_type} logits off by {error:.0%})"
    return cache.PROVEN


def relative_error(reference: list[float], candidate: list[float]) -> float:
    """Largest difference relative to the reference's largest magnitude; NaN if either holds a NaN or infinity."""
    if len(candidate) != len(reference):
        return float("inf")
    if not all(math.isfinite(x) for x in (*reference, *candidate)):
        return float("nan")
    scale = max(max(abs(x) for x in reference), 1e-6)
    return max(abs(a - b) for a, b in zip(reference, candidate, strict=True)) / scale

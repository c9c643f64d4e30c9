"""What this machine offers and what the runtime chose to use: CPU features, CPU kernels, GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import backends, kernel_proof, packaged
from runtime.cpu_features import CpuInfo, cpu_info


@dataclass(frozen=True)
class Hardware:
    cpu: CpuInfo
    cpu_backend: backends.CpuBackend
    offload: backends.Offload

    def as_dict(self) -> dict[str, Any]:
        device = self.offload.device
        return {
            "cpu": {"name": self.cpu.name, "features": list(self.cpu.features)},
            "cpu_variant": self.cpu_backend.variant,
            "cpu_variants_runnable": list(self.cpu_backend.runnable),
            "cpu_variant_proof": self.cpu_backend.proof,
            "gpu": None if device is None else {"backend": device.backend, "name": device.name, "description": device.description},
            "gpu_layers": self.offload.layers,
            "offload": self.offload.note,
        }

    def lines(self) -> list[str]:
        return [
            f"CPU: {self.cpu.name}",
            f"CPU features: {' '.join(self.cpu.features) or 'none beyond the x86-64 baseline'}",
            f"CPU kernels loaded: {self.cpu_backend.variant} ({self.cpu_backend.path.name}, llama.cpp score {self.cpu_backend.score}; "
            f"runnable here: {', '.join(self.cpu_backend.runnable)})",
            f"CPU kernels self-test: {self.cpu_backend.proof}",
            f"GPU: {self.offload.note}",
        ]


def choose_cpu_kernels(cpu_variant: str | None, say: Callable[[str], None]) -> tuple[CpuInfo, backends.CpuBackend]:
    """Detect the CPU, choose its kernels (forced, or the best that passes the self-test) and load them.

    `say` tells the user about a first-time self-test.
    """
    cpu = cpu_info()
    scores, warnings = backends.variant_scores(expected=_variants_in_stub())
    if cpu_variant is not None:
        chosen = backends.forced_variant(scores, cpu_variant)
        proof = f"{chosen.name}: forced with --cpu-variant, not proven"
    else:
        verdict = kernel_proof.choose(backends.ranked(scores), cpu.signature, _proof_threads(), say)
        chosen, proof = verdict.variant, verdict.note
        if verdict.warning:
            warnings.append(verdict.warning)
    return cpu, backends.load_cpu_backend(chosen, scores, warnings, proof, forced=cpu_variant is not None)


def add_gpu(cpu: CpuInfo, cpu_backend: backends.CpuBackend, gpu: str, gpu_layers: int | None) -> Hardware:
    """Load the GPU backends (unless --gpu off) and decide the offload.

    Only in the process that runs the model, after every fork (the self-test's, the supervisor's):
    a GPU runtime initialised before a fork is unusable in the child.
    """
    devices = backends.load_gpu_backends() if gpu != "off" else []
    return Hardware(cpu=cpu, cpu_backend=cpu_backend, offload=backends.choose_offload(devices, gpu, gpu_layers))


def _proof_threads() -> int:
    """Threads for the self-test: several, so that per-thread state (AMX tile configuration) is tested."""
    return min(4, backends.default_threads())


def _variants_in_stub() -> list[str] | None:
    """The CPU variants build.py put into this stub, to notice missing ones; None from source."""
    info = packaged.stub_info()
    if info is None:
        return None
    return [backends.variant_name(Path(name)) for name in info["cpu_variants"]]  # type: ignore[union-attr]

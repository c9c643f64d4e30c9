"""What this machine offers and what the runtime chose to use: CPU features, CPU kernels, GPUs.

The one place that asks the devices package (runtime/devices/) what can compute here and how well:
the CPU's kernels (each variant proven before use), then the GPU backends the runtime carries (each GPU
proven before use), then how the model's layers are placed on what was found.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import packaged
from runtime.devices import cpu, gpu, offload
from runtime.devices import proof as kernel_proof
from runtime.devices.cpu_features import CpuInfo, cpu_info
from runtime.devices.proof import gpu as gpu_proof


@dataclass(frozen=True)
class Hardware:
    cpu: CpuInfo
    cpu_backend: cpu.CpuBackend
    gpus: tuple[gpu.GpuDevice, ...]  # proven, and registered in this process
    gpu_notes: tuple[str, ...]  # one line per backend or GPU passed over, and why
    offload: offload.Offload

    def placed(self, decision: offload.Offload) -> Hardware:
        return Hardware(self.cpu, self.cpu_backend, self.gpus, self.gpu_notes, decision)

    def with_workers(self, workers: tuple[gpu.GpuDevice, ...]) -> Hardware:
        """The devices of --rpc's workers before this machine's GPUs (as llama.cpp orders them: the output layer,
        placed last, stays here where it can)."""
        return Hardware(self.cpu, self.cpu_backend, workers + self.gpus, self.gpu_notes, self.offload)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu": {"name": self.cpu.name, "features": list(self.cpu.features)},
            "cpu_variant": self.cpu_backend.variant,
            "cpu_variants_runnable": list(self.cpu_backend.runnable),
            "cpu_variant_proof": self.cpu_backend.proof,
            "gpus": [
                {
                    "backend": g.backend, "name": g.name, "description": g.description,
                    "memory_free": g.free_bytes, "memory_total": g.total_bytes, "used": g in self.offload.gpus,
                    "endpoint": g.endpoint,
                }
                for g in self.gpus
            ],
            "gpu": None if not self.offload.gpus else {"backend": self.offload.gpus[0].backend, "name": self.offload.gpus[0].name,
                                                        "description": self.offload.gpus[0].description},
            "gpu_layers": self.offload.layers,
            "layers_total": self.offload.total_layers,
            "offload": self.offload.note,
            "gpu_notes": list(self.gpu_notes),
        }

    def lines(self) -> list[str]:
        return [
            f"CPU: {self.cpu.name}",
            f"CPU features: {' '.join(self.cpu.features) or 'none beyond the x86-64 baseline'}",
            f"CPU kernels loaded: {self.cpu_backend.variant} ({self.cpu_backend.path.name}, llama.cpp score {self.cpu_backend.score}; "
            f"runnable here: {', '.join(self.cpu_backend.runnable)})",
            f"CPU kernels self-test: {self.cpu_backend.proof}",
            *(
                f"RPC worker: {g.name} at {g.endpoint}, {g.free_bytes >> 20} MiB free of {g.total_bytes >> 20} MiB"
                if g.endpoint else f"GPU found: {g.name} {g.description}, {g.free_bytes >> 20} MiB free of {g.total_bytes >> 20} MiB ({g.backend})"
                for g in self.gpus
            ),
            *(f"GPU: {note}" for note in self.gpu_notes),
            f"GPU: {self.offload.note}",
        ]


def choose_cpu_kernels(cpu_variant: str | None, say: Callable[[str], None]) -> tuple[CpuInfo, cpu.CpuBackend]:
    """Detect the CPU, choose its kernels (forced, or the best that passes the self-test) and load them.

    `say` tells the user about a first-time self-test.
    """
    info = cpu_info()
    scores, warnings = cpu.variant_scores(expected=_variants_in_stub())
    if cpu_variant is not None:
        chosen = cpu.forced_variant(scores, cpu_variant)
        proof = f"{chosen.name}: forced with --cpu-variant, not proven"
    else:
        verdict = kernel_proof.choose(cpu.ranked(scores), info.signature, _proof_threads(), say)
        chosen, proof = verdict.variant, verdict.note
        if verdict.warning:
            warnings.append(verdict.warning)
    return info, cpu.load_cpu_backend(chosen, scores, warnings, proof, forced=cpu_variant is not None)


def add_gpus(info: CpuInfo, cpu_backend: cpu.CpuBackend, mode: str, say: Callable[[str], None]) -> Hardware:
    """Prove the GPU backends this runtime carries (unless --gpu off), then register the best one's proven GPUs.

    Only in the process that runs the model, after every fork (the self-test's, the supervisor's): a GPU
    runtime initialised before a fork is unusable in the child. So every backend's self-test runs first,
    and only then is one loaded here: the first (in gpu.GPU_BACKENDS' order) with a proven GPU; the others
    are not loaded at all, so that one GPU is never offered twice (by CUDA and by Vulkan).
    """
    if mode == "off":
        return Hardware(info, cpu_backend, (), (), offload.cpu_only("GPU off (--gpu off): running on the CPU"))
    modules = gpu.modules()
    if not modules:
        return Hardware(info, cpu_backend, (), ("this runtime carries no GPU backend",), offload.cpu_only("no usable GPU: running on the CPU"))
    verdicts = {backend: gpu_proof.verdict(backend, module, cpu_backend.path, _proof_threads(), say) for backend, module in modules.items()}
    notes: list[str] = []
    for backend, module in modules.items():
        verdict = verdicts[backend]
        if verdict is not None and verdict.failure is not None:
            said_by_backend = verdict.failure.startswith(f"{backend}: ")  # no driver, no GPU: already one line
            notes.append(verdict.failure if said_by_backend else f"{backend}: {verdict.failure} in the self-test, passed over")
            continue
        found, why = gpu.load(backend, module)
        if why is not None:
            notes.append(why)
            continue
        proven = []
        for device in found:
            said = None if verdict is None else verdict.gpus.get(device.key)
            if verdict is None:
                notes.append(f"{device.name} {device.description}: not proven (the self-test needs a child process, which {sys.platform} cannot start)")
                proven.append(device)
            elif said == kernel_proof.cache.PROVEN:
                proven.append(device)
            else:
                notes.append(f"{device.name} {device.description} {said or 'was not in the self-test'}, passed over")
        if proven:
            return Hardware(info, cpu_backend, tuple(proven), tuple(notes), offload.cpu_only("not placed yet"))
    return Hardware(info, cpu_backend, (), tuple(notes), offload.cpu_only("no usable GPU: running on the CPU"))


# ggml's NUMA strategies (enum ggml_numa_strategy) by --numa's names.
NUMA_STRATEGIES = {"distribute": 1, "isolate": 2, "numactl": 3}


def numa_init(strategy: str) -> None:
    """Place the CPU threads on NUMA nodes as --numa asks (llama.cpp's own llama_numa_init), once the CPU kernels are
    registered: it reaches them through ggml's registry."""
    import llama_cpp

    llama_cpp.llama_numa_init(NUMA_STRATEGIES[strategy])


def _proof_threads() -> int:
    """Threads for the self-test: several, so that per-thread state (AMX tile configuration) is tested."""
    return min(4, cpu.default_threads())


def _variants_in_stub() -> list[str] | None:
    """The CPU variants build.py put into this stub, to notice missing ones; None from source."""
    info = packaged.stub_info()
    if info is None:
        return None
    return [cpu.variant_name(Path(name)) for name in info["cpu_variants"]]  # type: ignore[union-attr]

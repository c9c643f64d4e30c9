"""What this machine offers and what the runtime chose to use: CPU features, CPU kernels, GPU."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import backends
from runtime.cpu_features import CpuInfo, cpu_info
from runtime.platform_tag import STUB_INFO_NAME


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
            f"GPU: {self.offload.note}",
        ]


def set_up(cpu_variant: str | None, gpu: str, gpu_layers: int | None) -> Hardware:
    """Detect the CPU, load the CPU kernels (forced or best) and, unless --gpu off, GPU backends."""
    cpu_backend = backends.load_cpu_backend(forced=cpu_variant, expected=_variants_in_stub())
    devices = backends.load_gpu_backends() if gpu != "off" else []
    return Hardware(cpu=cpu_info(), cpu_backend=cpu_backend, offload=backends.choose_offload(devices, gpu, gpu_layers))


def _variants_in_stub() -> list[str] | None:
    """The CPU variants build.py put into this stub, to notice missing ones; None from source."""
    if not getattr(sys, "frozen", False):
        return None
    info = json.loads((Path(sys._MEIPASS) / STUB_INFO_NAME).read_text())  # type: ignore[attr-defined]
    return [backends.variant_name(Path(name)) for name in info["cpu_variants"]]

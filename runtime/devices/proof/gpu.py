"""Proving a GPU backend on this machine's GPUs before the model goes on them, as the CPU kernels are proven.

A GPU driver can crash, hang or compute wrongly where the backend was never tried (an old driver, a
software device, a card with too little memory for its own shaders). So, in a child process, the backend
is loaded, its GPUs listed, and the self-test's model run on each GPU with every layer on it; its logits
are compared with those of the CPU kernels this process already proved. A backend that dies or hangs, and
a GPU that answers differently, are passed over with one line. Verdicts are kept per backend build and
driver (gpu.driver_fingerprint) and per GPU, so a later start loads only what was proven, at no cost.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from runtime import __version__, packaged
from runtime.devices import gpu
from runtime.devices import proof
from runtime.devices.proof import TIMEOUT_S, cache, child, workload

# A GPU driver compiles each kernel's shader on first use: milliseconds each on a real GPU's driver, but Mesa's
# software device (llvmpipe) took 107 s for the eight weight types on 2 busy cores, the first time (its shader
# cache makes the next runs take 2 s). A hung driver is still caught.
GPU_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class BackendVerdict:
    """What the self-test found of one GPU backend here: why it failed as a whole, or each GPU's verdict."""

    failure: str | None = None  # "vulkan: no GPU found", "died with SIGSEGV", "hung for 300 s"
    gpus: dict[str, str] = field(default_factory=dict)  # GpuDevice.key -> "proven" or "gave wrong results (...)"

    def to_json(self) -> str:
        return json.dumps({"failure": self.failure, "gpus": self.gpus}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BackendVerdict | None:
        try:
            raw = json.loads(text)
            return cls(failure=raw["failure"], gpus=dict(raw["gpus"]))
        except (ValueError, KeyError, TypeError):
            return None

    def lasting(self, backend: str) -> bool:
        """Whether it says something about the backend on this machine rather than about this moment (a hang on
        a busy machine, a kill from outside, memory another program holds): only those are cached. What the
        backend itself said (no GPU, no driver) lasts until the driver's fingerprint changes."""
        if self.failure is None:
            return all(verdict == cache.PROVEN or proof.lasting(verdict) for verdict in self.gpus.values())
        return self.failure.startswith(f"{backend}: ") or proof.lasting(self.failure)


def verdict(backend: str, module: Path, cpu_library: Path, threads: int, say: Callable[[str], None]) -> BackendVerdict | None:
    """The self-test's verdict on `backend`'s GPUs here: from the cache, or proven now in child processes.
    None where it cannot run (no child process).

    Call it before this process loads any GPU backend, with the CPU kernels of `cpu_library` registered (a
    spawned child registers them itself).
    """
    if not child.available():
        return None
    verdicts = cache.VerdictCache(packaged.cache_dir() / "kernel-proofs.json")
    key = f"gpu {gpu.driver_fingerprint(backend)}|{backend}|{_build_identity(module)}|runtime {__version__}|proof {cache.PROOF_VERSION}"
    known = verdicts.get(key)
    found = BackendVerdict.from_json(known) if known is not None else None
    if found is None:
        say(f"checking the {backend} GPU backend on this machine's GPUs (once per GPU, driver and runtime build)...")
        found = _prove(backend, module, cpu_library, threads)
        if found.lasting(backend):
            verdicts.put(key, found.to_json())
    return found


def _build_identity(module: Path) -> str:
    """The module's build, cheaply: its size and time (a runtime's unpacked folder never changes; a rebuilt module
    in a checkout gets a new time). Hashing it, as the CPU variants are, would read 44 MB at every start."""
    stat = module.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _prove(backend: str, module: Path, cpu_library: Path, threads: int) -> BackendVerdict:
    # First whether the backend loads and finds a GPU at all (milliseconds), then the self-test.
    probe = child.run_with_cpu(backend, cpu_library, partial(_unusable, backend, module), GPU_TIMEOUT_S)
    if probe.result is None or probe.result["unusable"] is not None:
        return BackendVerdict(failure=str(probe.failure) if probe.result is None else probe.result["unusable"])
    with tempfile.TemporaryDirectory(prefix="llamabox-proof-") as directory:
        base = packaged.proof_model(fallback=Path(directory))
        models = workload.model_paths(base, Path(directory))
        # The CPU kernels this process registered (and proved): no GPU is loaded in this child.
        reference = child.run_with_cpu("cpu", cpu_library, partial(workload.quantized_logits, base, models, threads), TIMEOUT_S)
        if reference.result is None:
            return BackendVerdict(failure=f"not tested: the CPU reference {reference.failure}")
        outcome = child.run_with_cpu(backend, cpu_library, partial(_run_on_gpus, backend, module, models, threads), GPU_TIMEOUT_S)
    if outcome.result is None:
        return BackendVerdict(failure=str(outcome.failure))
    return BackendVerdict(gpus={key: proof.judge(reference.result, logits) for key, logits in outcome.result.items()})


def _unusable(backend: str, module: Path) -> dict[str, str | None]:
    """In the child: why the backend cannot be used here (it does not load, or finds no GPU), or None."""
    return {"unusable": gpu.load(backend, module)[1]}


def _run_on_gpus(backend: str, module: Path, models: dict[str, Path], threads: int) -> dict[str, dict[str, list[float]]]:
    """In the child: load the backend, then every weight type's logits on each of its GPUs."""
    gpus, _ = gpu.load(backend, module)
    return {device.key: workload.run(models, threads, device.index) for device in gpus}

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
from typing import Any

from runtime import packaged
from runtime.devices import gpu
from runtime.devices.proof import TIMEOUT_S, TOLERANCE, cache, child, relative_error, workload

# A GPU driver compiles each kernel's shader on first use: milliseconds each on a real GPU's driver, but Mesa's
# software device (llvmpipe) took 107 s for the eight weight types on 2 busy cores, the first time (its shader
# cache makes the next runs take 2 s). A hung driver is still caught.
GPU_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class BackendVerdict:
    """What the self-test found of one GPU backend here: why it failed as a whole, or each GPU's verdict."""

    failure: str | None = None  # "died with SIGSEGV", "hung for 120 s"
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

    @property
    def lasting(self) -> bool:
        """Whether it says something about the backend on this machine rather than about this moment
        (a hang on a busy machine, a kill from outside): only those are cached."""
        return self.failure is None or not self.failure.startswith(("hung", "could not be started", "not tested", "died with SIGKILL", "died with SIGTERM"))


def verdict(backend: str, module: Path, threads: int, say: Callable[[str], None]) -> BackendVerdict:
    """The self-test's verdict on `backend`'s GPUs here: from the cache, or proven now in child processes.

    Call it before this process loads any GPU backend, with the CPU kernels registered.
    """
    verdicts = cache.VerdictCache(packaged.cache_dir() / "kernel-proofs.json")
    key = cache.key(f"gpu {gpu.driver_fingerprint(backend)}", backend, module)
    known = verdicts.get(key)
    found = BackendVerdict.from_json(known) if known is not None else None
    if found is None:
        if not child.can_fork():
            return BackendVerdict(failure=None, gpus={})  # unproven: hardware.py says so
        say(f"checking the {backend} GPU backend on this machine's GPUs (once per GPU, driver and runtime build)...")
        found = _prove(backend, module, threads)
        if found.lasting:
            verdicts.put(key, found.to_json())
    return found


def _prove(backend: str, module: Path, threads: int) -> BackendVerdict:
    # First whether the backend loads and finds a GPU at all (milliseconds), then the self-test.
    probe = child.run(backend, partial(_gpu_keys, backend, module), GPU_TIMEOUT_S)
    if probe.result is None or "unusable" in probe.result:
        return BackendVerdict(failure=str(probe.failure) if probe.result is None else probe.result["unusable"])
    with tempfile.TemporaryDirectory(prefix="llamabox-proof-") as directory:
        base = packaged.proof_model(fallback=Path(directory))
        models = workload.model_paths(base, Path(directory))

        def quantize_and_run() -> dict[str, list[float]]:
            workload.quantize(base, models)
            return workload.run(models, threads)

        reference = child.run("cpu", quantize_and_run, TIMEOUT_S)
        if reference.result is None:
            return BackendVerdict(failure=f"not tested: the CPU reference {reference.failure}")
        outcome = child.run(backend, partial(_run_on_gpus, backend, module, models, threads), GPU_TIMEOUT_S)
    if outcome.result is None:
        return BackendVerdict(failure=str(outcome.failure))
    return BackendVerdict(gpus={key: _judge(reference.result, logits) for key, logits in outcome.result.items()})


def _gpu_keys(backend: str, module: Path) -> dict[str, Any]:
    """In the child: whether the backend loads here, and its GPUs."""
    gpus, why = gpu.load(backend, module)
    return {"unusable": why} if why is not None else {"gpus": [device.key for device in gpus]}


def _run_on_gpus(backend: str, module: Path, models: dict[str, Path], threads: int) -> dict[str, dict[str, list[float]]]:
    """In the child: load the backend, then every weight type's logits on each of its GPUs."""
    gpus, _ = gpu.load(backend, module)
    return {device.key: workload.run(models, threads, device.index) for device in gpus}


def _judge(reference: dict[str, list[float]], logits: dict[str, list[float]]) -> str:
    worst_type, error = max(((name, relative_error(reference[name], logits[name])) for name in reference), key=lambda e: e[1])
    if not error <= TOLERANCE:  # NaN, as broken kernels often give, fails too
        return f"gave wrong results ({worst_type} logits off by {error:.0%})"
    return cache.PROVEN

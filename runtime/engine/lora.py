"""LoRA adapters, as llama-server handles them: loaded with the model (--lora, --lora-scaled), each with a scale that
new requests get (GET and POST /lora-adapters), or the scales a request asks for itself (its `lora` field).

llama.cpp applies one set of adapters and scales to a whole decode call, so the scheduler decodes requests with
different scales in separate steps (`apply` before each), and never reuses a cache computed under other scales.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from runtime.engine.loader import c_file_at
from runtime.engine.quiet import quiet
from runtime.model_source import ModelLocation
from runtime.errors import LlamaboxError, ModelFileError

# A request's scales, one per adapter in load order; () where the server has none.
Scales = tuple[float, ...]


class LoraError(LlamaboxError):
    """A request or a POST /lora-adapters naming an adapter the server does not have (a 400)."""


@dataclass(frozen=True)
class LoraFile:
    """One --lora (scale 1) or --lora-scaled FILE:SCALE, or an adapter a bundle carries (at `offset` in it)."""

    path: Path
    scale: float = 1.0
    offset: int = 0
    name: str | None = None  # what /lora-adapters calls it: its path, or a carried adapter's file name

    @property
    def shown(self) -> str:
        return self.name or str(self.path)


class Adapters:
    def __init__(self, model: Any, files: list[LoraFile], verbose: bool) -> None:
        self.names = [file.shown for file in files]
        self.scales: list[float] = [file.scale for file in files]  # what new requests get (POST /lora-adapters)
        self._handles: list[Any] = []
        for file in files:
            with quiet(verbose), c_file_at(ModelLocation(file.path, file.offset)) as fp:
                handle = llama_cpp.llama_adapter_lora_init_from_file_ptr(model, fp) if fp else None
            if not handle:
                for loaded in self._handles:  # the rest go with the model, which frees its adapters itself
                    llama_cpp.llama_adapter_lora_free(loaded)
                raise ModelFileError(
                    f"--lora {file.shown}: llama.cpp cannot apply it to this model (not a LoRA GGUF, or made for another "
                    "model or architecture); give an adapter converted for this model"
                )
            self._handles.append(handle)
        self._array = (llama_cpp.llama_adapter_lora_p_ctypes * max(1, len(self._handles)))(*self._handles)
        self._applied: Scales | None = None

    def __len__(self) -> int:
        return len(self._handles)

    def describe(self) -> list[dict[str, Any]]:
        """llama-server's GET /lora-adapters: id, path, scale, and the adapter's own task name and prompt prefix."""
        return [
            {"id": i, "path": name, "scale": scale, "task_name": self._meta(i, "adapter.lora.task_name"),
             "prompt_prefix": self._meta(i, "adapter.lora.prompt_prefix")}
            for i, (name, scale) in enumerate(zip(self.names, self.scales, strict=True))
        ]

    def scales_for(self, config: dict[int, float] | None) -> Scales:
        """A request's scales: its own `config` (adapters it leaves out get 0, as llama-server's), else the current ones."""
        if config is None:
            return tuple(self.scales)
        self._check(config)
        return tuple(config.get(i, 0.0) for i in range(len(self)))

    def set_scales(self, config: dict[int, float]) -> None:
        """POST /lora-adapters: the scales new requests get from now on (those left out: 0)."""
        self.scales = list(self.scales_for(config))

    def apply(self, context: Any, scales: Scales) -> None:
        """Have the context compute with `scales` (before a decode call), unless it already does."""
        if scales == self._applied or not self._handles:
            return
        values = (ctypes.c_float * len(scales))(*scales)
        if llama_cpp.llama_set_adapters_lora(context, self._array, len(self._handles), values) != 0:
            raise RuntimeError("llama.cpp could not apply the LoRA adapters")
        self._applied = scales

    def _check(self, config: dict[int, float]) -> None:
        for adapter_id in config:
            if not 0 <= adapter_id < len(self):
                have = f"ids 0 to {len(self) - 1}" if len(self) else "none (start it with --lora FILE)"
                raise LoraError(f"there is no LoRA adapter {adapter_id}: this server has {have}")

    def _meta(self, index: int, key: str) -> str:
        buffer = ctypes.create_string_buffer(1024)
        n = llama_cpp.llama_adapter_meta_val_str(self._handles[index], key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace") if n >= 0 else ""

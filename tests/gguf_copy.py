"""Copies of a real GGUF with a change made to its metadata or its weights, for tests whose expected outputs follow
from that change (another tokenizer, weights whose outputs are the original's transformed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np


def copy_gguf(
    base: Path, path: Path, field: Callable[[str, Any], Any] | None = None, tensor: Callable[[str, np.ndarray], np.ndarray] | None = None
) -> Path:
    """`base` written again to `path`, each metadata value through `field(name, value)` and each tensor's data
    through `tensor(name, data)` (a tensor's type and shape stay)."""
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(str(path), str(reader.fields["general.architecture"].contents()))
    for item in reader.fields.values():
        if item.name.startswith("GGUF.") or item.name == "general.architecture":
            continue
        value = item.contents()
        if field is not None:
            value = field(item.name, value)
        array = item.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(item.name, value, item.types[0], sub_type=item.types[-1] if array else None)
    for t in reader.tensors:
        data = tensor(t.name, t.data) if tensor is not None else t.data
        writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def other_vocabulary(base: Path, path: Path) -> Path:
    """`base` with one token's text changed: a tokenizer that is not the model's."""

    def renamed(name: str, value: Any) -> Any:
        if name == "tokenizer.ggml.tokens":
            value[1000] = "not-a-token-of-this-model"
        return value

    return copy_gguf(base, path, field=renamed)

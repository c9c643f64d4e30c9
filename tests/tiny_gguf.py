"""Tiny GGUF files with random weights, for format and validation tests (not for answers)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_tiny_gguf(path: Path, *, chat_template: str | None = None, license: str | None = "mit") -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Test Model")
    writer.add_context_length(256)
    if license:
        writer.add_license(license)
    if chat_template:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((32, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

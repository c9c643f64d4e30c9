"""Splitting a GGUF into NAME-0000i-of-0000n.gguf parts with the `gguf` package, as llama.cpp's split tool does."""

from __future__ import annotations

import math
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def split_gguf(source: Path, directory: Path, parts: int, stem: str | None = None) -> list[Path]:
    """Write `source` as `parts` split files in `directory` (metadata in the first); returns their paths."""
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    per_part = math.ceil(len(reader.tensors) / parts)
    writer = GGUFWriter(directory / f"{stem or source.stem}.gguf", arch, split_max_tensors=per_part)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the writer adds the header fields and the architecture itself
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    written = sorted(directory.glob(f"{stem or source.stem}-*-of-*.gguf"))
    assert len(written) == parts, written
    return written

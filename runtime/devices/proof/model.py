"""The kernel self-test's model: a one-layer llama with random F16 weights and no vocabulary.

It is small (under 1 MB) but shaped so that every matrix multiplication takes the same kernels a
real model takes: each K dimension is 256 (a whole K-quant super-block, and a multiple of every
alignment the AMX and repacking paths ask for), and every row count is a multiple of 32 (AMX
handles 2 tiles of 16 rows at a time). build.py writes it into the stub; from a checkout, the
runtime writes it into its cache the first time. The weights come from a fixed seed, so every
copy is byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.partial_file import create_beside

N_EMBD = 256
N_FF = 256
N_HEAD = 4
N_VOCAB = 64
N_CTX = 64
_SEED = 20261126


def ensure(path: Path) -> Path:
    """`path`, written first if it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = create_beside(path)
        os.close(fd)
        try:
            write(Path(partial))
            os.replace(partial, path)
        finally:
            Path(partial).unlink(missing_ok=True)
    return path


def write(path: Path) -> None:
    import gguf  # only where the model is written (build time, or a checkout), never in the stub
    import numpy as np

    rng = np.random.default_rng(_SEED)

    def matrix(rows: int, columns: int) -> np.ndarray:
        # numpy's shape is ggml's reversed: `columns` is the K (input) dimension.
        return (rng.standard_normal((rows, columns)) / np.sqrt(columns)).astype(np.float16)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llamabox kernel self-test")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(1)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("no_vocab")
    writer.add_vocab_size(N_VOCAB)
    ones = np.ones(N_EMBD, dtype=np.float32)
    writer.add_tensor("token_embd.weight", (rng.standard_normal((N_VOCAB, N_EMBD))).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", ones)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", matrix(N_EMBD, N_EMBD))
    writer.add_tensor("blk.0.ffn_norm.weight", ones)
    writer.add_tensor("blk.0.ffn_gate.weight", matrix(N_FF, N_EMBD))
    writer.add_tensor("blk.0.ffn_up.weight", matrix(N_FF, N_EMBD))
    writer.add_tensor("blk.0.ffn_down.weight", matrix(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", matrix(N_VOCAB, N_EMBD))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

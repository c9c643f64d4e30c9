"""A reranker written with the `gguf` package: a one-layer BERT with a ranking head, whose score for a query and a
document follows from its weights by a few lines of NumPy (`expected_score`), so the tests know each answer.

Its attention has zero queries and keys (every token attends to every other equally: each position adds the mean
of the values) and identity values and output, its feed-forward is zero; the ranking head reads the first token
([CLS]) of the last layer. The word "cat" points along the head's direction, so documents about cats rank first.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

WORDS = ["the", "a", "cat", "cats", "dog", "bird", "sat", "on", "mat", "flew", "away", "sleeps", "sleep", "where", "do", "is", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *(f"\u2581{w}" for w in WORDS)]  # llama.cpp marks every word's start, "." too
PAD, UNK, CLS, SEP = 0, 1, 2, 3
N_EMBD, N_CTX, EPS = 8, 64, 1e-12


def embeddings() -> np.ndarray:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((len(VOCAB), N_EMBD)).astype(np.float32)
    for word in ("\u2581cat", "\u2581cats"):
        table[VOCAB.index(word), 0] += 6.0  # along the head
    return table


HEAD = np.eye(N_EMBD, dtype=np.float32)[:1]  # the score is the first component of [CLS]'s state
HEAD_BIAS = 0.25


def write_reranker(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("Tiny Test Reranker")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_EMBD)
    writer.add_block_count(1)
    writer.add_head_count(1)
    writer.add_layer_norm_eps(EPS)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(VOCAB)
    writer.add_token_types([gguf.TokenType.CONTROL if t.startswith("[") else gguf.TokenType.NORMAL for t in VOCAB])
    writer.add_token_type_count(2)
    writer.add_bos_token_id(CLS)
    writer.add_sep_token_id(SEP)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    zeros, ones, eye = np.zeros(N_EMBD, np.float32), np.ones(N_EMBD, np.float32), np.eye(N_EMBD, dtype=np.float32)
    writer.add_tensor("token_embd.weight", embeddings())
    writer.add_tensor("position_embd.weight", np.zeros((N_CTX, N_EMBD), np.float32))
    writer.add_tensor("token_types.weight", np.zeros((2, N_EMBD), np.float32))
    writer.add_tensor("token_embd_norm.weight", ones)
    writer.add_tensor("token_embd_norm.bias", zeros)
    for name, value in [("attn_q", 0 * eye), ("attn_k", 0 * eye), ("attn_v", eye), ("attn_output", eye)]:
        writer.add_tensor(f"blk.0.{name}.weight", value)
    writer.add_tensor("blk.0.attn_output_norm.weight", ones)
    writer.add_tensor("blk.0.attn_output_norm.bias", zeros)
    writer.add_tensor("blk.0.ffn_up.weight", 0 * eye)
    writer.add_tensor("blk.0.ffn_down.weight", 0 * eye)
    writer.add_tensor("blk.0.layer_output_norm.weight", ones)
    writer.add_tensor("blk.0.layer_output_norm.bias", zeros)
    writer.add_tensor("cls.output.weight", HEAD)
    writer.add_tensor("cls.output.bias", np.array([HEAD_BIAS], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)


def tokens(text: str) -> list[int]:
    """WordPiece as llama.cpp does it for this vocabulary: lower case, words and '.', each a whole token or unknown."""
    words = [f"\u2581{w}" for w in text.lower().replace(".", " . ").split()]
    return [VOCAB.index(w) if w in VOCAB else UNK for w in words]


def expected_score(query: str, document: str) -> float:
    """The head's output for llama-server's pair: [CLS] query [SEP] document."""
    ids = [CLS, *tokens(query), SEP, *tokens(document)]
    x = _norm(embeddings()[ids])
    h = _norm(x + x.mean(0))  # uniform attention adds the mean of the values; then the residual's norm
    out = _norm(h)  # the feed-forward adds nothing
    return float(out[0] @ HEAD[0] + HEAD_BIAS)

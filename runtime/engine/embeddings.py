"""Embeddings in a llama.cpp context of their own, over the same mapped weights, so that an embedding
request never disturbs the chat slots. Pooled per text (the model's own pooling, or the mean of the
tokens when the model names none) and scaled to unit length, as llama-server's OpenAI route does."""

from __future__ import annotations

import math
import threading
from typing import Any

import llama_cpp

from runtime.errors import LlamaboxError
from runtime.engine.quiet import quiet


class EmbeddingError(LlamaboxError):
    """A text that cannot be embedded (too long for the context)."""


MAX_TOKENS = 2048  # per text: the whole text is one step, and the context's buffers grow with it


def pooled(context: Any, model: Any, tokens: list[int]) -> Any:
    """Read `tokens` whole in one step as the pooling context's one sequence, from an empty cache: the pooled output
    (llama.cpp's floats for sequence 0: an embedding, or a reranker's score), or None where llama.cpp could not."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        run = llama_cpp.llama_encode if llama_cpp.llama_model_has_encoder(model) else llama_cpp.llama_decode
        return llama_cpp.llama_get_embeddings_seq(context, 0) if run(context, batch) == 0 else None
    finally:
        llama_cpp.llama_batch_free(batch)


class Embedder:
    def __init__(self, model: Any, metadata: dict[str, str], n_ctx: int, threads: int | None, verbose: bool) -> None:
        self._model, self._n_ctx, self._threads, self._verbose = model, min(n_ctx, MAX_TOKENS), threads, verbose
        self.max_tokens = self._n_ctx  # a text's tokens at most
        architecture = metadata.get("general.architecture", "")
        self._pooling = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if f"{architecture}.pooling_type" in metadata else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._n_embd = llama_cpp.llama_model_n_embd(model)
        self._context: Any = None
        self._lock = threading.Lock()  # one context, one text at a time

    def embed(self, tokens: list[int]) -> list[float]:
        if not tokens:
            raise EmbeddingError("the text to embed is empty")
        if len(tokens) > self._n_ctx:
            raise EmbeddingError(f"the text is {len(tokens)} tokens but embeddings take at most {self._n_ctx}; shorten it")
        with self._lock:
            output = pooled(self._context or self._new_context(), self._model, tokens)
            if output is None:
                raise EmbeddingError("llama.cpp could not evaluate the text for its embedding")
            vector = [float(output[i]) for i in range(self._n_embd)]
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    def close(self) -> None:
        with self._lock:
            if self._context:
                llama_cpp.llama_free(self._context)
                self._context = None

    def _new_context(self) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.embeddings, params.pooling_type = True, self._pooling
        params.n_ctx = params.n_batch = params.n_ubatch = self._n_ctx  # a whole text in one step, as pooling needs
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self._threads or 0
        with quiet(self._verbose):
            self._context = llama_cpp.llama_init_from_model(self._model, params)
        if not self._context:
            raise EmbeddingError(
                f"llama.cpp could not make a context of {self._n_ctx} tokens for embeddings (most likely its buffers did not fit beside the "
                "model in its devices' memory); start the server with a smaller --ctx-size, or give the GPU or RPC workers more memory"
            )
        return self._context

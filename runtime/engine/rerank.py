"""Reranking, as llama-server's /rerank computes it: a reranker (a model with a ranking head, llama.cpp's pooling type
"rank") reads the query and one document together and gives one score, the head's raw output (no sigmoid).

The pair is written as llama-server writes it: through the model's `rerank` template ({query} and {document})
where it has one, else BOS, the query, EOS, SEP, the document, EOS, each where the tokenizer adds it. One context of
its own, a pair at a time: an encoder (BERT) reads the whole pair in one step, so the step is as long as the pair.
"""

from __future__ import annotations

import threading
from typing import Any

import llama_cpp

from runtime.engine.embeddings import pooled
from runtime.engine.quiet import quiet
from runtime.errors import LlamaboxError, ModelFileError

MAX_TOKENS = 2048  # a query and a document together, at most

_POOLING_RANK = llama_cpp.LLAMA_POOLING_TYPE_RANK


class RerankError(LlamaboxError):
    """A query and document the reranker cannot read (too long, empty)."""


def check_reranker(metadata: dict[str, str], name: str) -> None:
    """Refuse a model without a ranking head: its 'scores' would be meaningless."""
    architecture = metadata.get("general.architecture", "")
    if metadata.get(f"{architecture}.pooling_type") != str(_POOLING_RANK):
        raise ModelFileError(
            f"{name} is not a reranker (its pooling type is not rank, so it has no ranking head); give a reranking model "
            "such as bge-reranker or Qwen3-Reranker"
        )


class Reranker:
    def __init__(self, model: Any, threads: int | None, verbose: bool) -> None:
        """`model`: the reranker, an engine.loader.InPlaceModel."""
        self._model = model
        self._vocab = model.vocab
        self.max_tokens = min(model.n_ctx_train(), MAX_TOKENS)
        template = llama_cpp.llama_model_chat_template(model.model, b"rerank")
        self._template = template.decode("utf-8") if template else None
        params = llama_cpp.llama_context_default_params()
        params.embeddings, params.pooling_type = True, _POOLING_RANK
        params.n_ctx = params.n_batch = params.n_ubatch = self.max_tokens
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads or 0
        with quiet(verbose):
            self._context = llama_cpp.llama_init_from_model(model.model, params)
        if not self._context:
            raise ModelFileError("llama.cpp could not make a reranking context for the reranker")
        self._lock = threading.Lock()

    def pair(self, query: str, document: str) -> list[int]:
        """The tokens the reranker reads for `query` and `document`."""
        if self._template is not None:
            text = self._template.replace("{query}", query).replace("{document}", document)
            return self._tokenize(text, special=True)
        vocab = self._vocab
        eos = llama_cpp.llama_vocab_eos(vocab)
        eos = eos if eos != llama_cpp.LLAMA_TOKEN_NULL else llama_cpp.llama_vocab_sep(vocab)
        add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        tokens = [llama_cpp.llama_vocab_bos(vocab)] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        tokens += self._tokenize(query, special=False) + ([eos] if add_eos else [])
        tokens += [llama_cpp.llama_vocab_sep(vocab)] if llama_cpp.llama_vocab_get_add_sep(vocab) else []
        return tokens + self._tokenize(document, special=False) + ([eos] if add_eos else [])

    def score(self, tokens: list[int]) -> float:
        """The ranking head's output for a pair's tokens (from `pair`)."""
        if len(tokens) > self.max_tokens:
            raise RerankError(f"the query and a document are {len(tokens)} tokens together, more than the reranker's {self.max_tokens}; shorten them")
        with self._lock:
            output = pooled(self._context, self._model.model, tokens)
            if output is None:
                raise RerankError("llama.cpp could not evaluate the query and document")
            return float(output[0])

    def close(self) -> None:
        with self._lock:
            if self._context:
                llama_cpp.llama_free(self._context)
                self._context = None

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special) if text else []


"""Per-request sampling: the settings a request may set, and the llama.cpp sampler chain built from them.

Each sequence gets a chain of its own, so requests with different settings decode in one batch.
The chain is llama.cpp's (llama_sampler_*): logit bias, then repetition penalties, then an
optional grammar, then greedy choice or top-k, top-p, min-p, temperature and a seeded draw.
"""

from __future__ import annotations

import ctypes
import random
import re
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from runtime.errors import LlamaboxError

PENALTY_LAST_N = 64  # tokens the repetition penalties look back over, as llama-cpp-python's default
# llama.cpp parses GBNF recursively and expands counted repetitions into rules: deep nesting or huge
# counts overflow its stack and kill the process, so grammars beyond these bounds are refused.
MAX_GRAMMAR_BYTES = 256 << 10
MAX_GRAMMAR_NESTING = 64
MAX_GRAMMAR_REPEAT = 1000


class SamplingError(LlamaboxError):
    """A sampling setting the model cannot take (a token id outside its vocabulary, a bad grammar)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF, rooted at "root"
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    n_keep: int | None = None  # prompt tokens a context shift keeps (-1: the whole prompt); None: the server's --keep
    lora: dict[int, float] | None = None  # this request's LoRA scales by adapter id; None: the server's current ones
    reasoning_budget: int = -1  # tokens of <think> reasoning before its end is forced (0: none at all); -1: no limit


# llama_token_data as numpy sees it: the candidates handed to llama.cpp's samplers
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def check_grammar(grammar: str) -> None:
    """Refuse a grammar that would crash llama.cpp's parser (see MAX_GRAMMAR_*); SamplingError says why."""
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise SamplingError(f"the grammar is longer than {MAX_GRAMMAR_BYTES >> 10} KB")
    depth = deepest = 0
    quote = None
    escaped = False
    for char in grammar:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "\"[":
            quote = "]" if char == "[" else char
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise SamplingError(f"the grammar nests parentheses {deepest} deep; at most {MAX_GRAMMAR_NESTING} are supported")
    counts = [int(n) for n in re.findall(r"\{\s*(\d+)", grammar) + re.findall(r",\s*(\d+)\s*\}", grammar)]
    if counts and max(counts) > MAX_GRAMMAR_REPEAT:
        raise SamplingError(f"the grammar repeats an item {max(counts)} times; at most {MAX_GRAMMAR_REPEAT} are supported")


class SamplerChain:
    """One sequence's llama.cpp sampler chain; freed with `close()`."""

    def __init__(self, sampling: Sampling, vocab: object, n_vocab: int) -> None:
        outside = [token for token in sampling.logit_bias if not 0 <= token < n_vocab]
        if outside:
            raise SamplingError(f"logit_bias names token {outside[0]}, outside the model's vocabulary of {n_vocab} tokens")
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._penalties = None
        self._grammar = None  # kept out of the chain: sample() checks that it allows some token before accepting one
        self._n_vocab = n_vocab
        try:
            self._build(sampling, vocab, n_vocab)
        except BaseException:
            self.close()
            raise

    def _build(self, s: Sampling, vocab: object, n_vocab: int) -> None:
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # noqa: E731
        if s.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(s.logit_bias))(
                *(llama_cpp.llama_logit_bias(token, bias) for token, bias in s.logit_bias.items())
            )
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), biases))
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            self._penalties = llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
            add(self._penalties)
        if s.grammar is not None:
            check_grammar(s.grammar)
            self._grammar = llama_cpp.llama_sampler_init_grammar(vocab, s.grammar.encode(), b"root")
            if not self._grammar:
                raise SamplingError("the grammar could not be parsed (GBNF with a rule named root)")
        if s.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        add(llama_cpp.llama_sampler_init_top_k(s.top_k))
        add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else random.getrandbits(32)
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept_prompt(self, token: int) -> None:
        """Tell the penalties about a prompt token (the grammar constrains only what is generated)."""
        if self._penalties is not None:
            llama_cpp.llama_sampler_accept(self._penalties, token)

    def accept(self, token: int) -> None:
        """Tell the chain (and the grammar) about a token chosen without it (a forced one), as sample() does its own."""
        if self._grammar:
            llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, context: object, index: int) -> int:
        """The next token from the logits at batch position `index` (accepted into the chain).

        With a grammar, the grammar masks the candidates first; where it allows no token at all, this
        raises SamplingError: llama.cpp aborts the whole process when a grammar is handed a token it
        does not allow.
        """
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, context, index))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, index), shape=(self._n_vocab,))
        candidates = np.empty(self._n_vocab, dtype=TOKEN_DATA)
        candidates["id"], candidates["logit"], candidates["p"] = np.arange(self._n_vocab), logits, 0.0
        array = llama_cpp.llama_token_data_array(
            candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), self._n_vocab, -1, False
        )
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        if not np.isfinite(candidates["logit"]).any():
            raise SamplingError("the grammar allows no token here: it cannot be satisfied")
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

"""Speculative decoding's drafter: a small model of the same vocabulary guesses the next tokens of each generating
request, and the target model checks the guesses of every request in its one decode call of the step (scheduler.py
keeps a guess only where the target's own sampler chose the same token, so the text is the target's, greedy or
sampled, token for token).

It drafts as llama-server's draft-simple does: the draft model's most likely token each time, its probability taken
over its ten best candidates; drafting stops at `n_max` tokens, or before a token less likely than `p_min`; a draft
shorter than `n_min` is not used. The draft context holds one sequence per slot, as the target's does; before drafting,
a sequence is brought up to the target's tokens, keeping the longest start the two share.

llama.cpp's common library has this loop (common_speculative), but llama-cpp-python binds only llama.h, so it is
written here over llama_decode, as the scheduler is.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

from runtime.engine.prompt_cache import common_prefix
from runtime.errors import LlamaboxError

TOP_K = 10  # the candidates a draft token's probability is taken over, as llama.cpp's drafter
# llama.cpp's tolerances for a draft vocabulary: sizes may differ a little (padding), and the first few ids are
# special tokens that may be named differently.
VOCAB_SIZE_SLACK, FIRST_CHECKED_TOKEN = 128, 5


@dataclass(frozen=True)
class DraftOptions:
    """llama-server's --spec-draft-* settings."""

    n_max: int = 3  # tokens drafted per step at most
    n_min: int = 0  # a shorter draft is not used
    p_min: float = 0.0  # drafting stops before a token the draft model gives a lower probability


def check_compatible(target: object, draft: object, draft_name: str) -> None:
    """Refuse a draft model whose tokens are not the target's (llama.cpp's checks): its guesses would be other words."""

    def differ(what: str) -> LlamaboxError:
        return LlamaboxError(
            f"{draft_name} cannot draft for this model: {what}; give a draft model of the same family (the same tokenizer)"
        )

    if llama_cpp.llama_vocab_type(target) != llama_cpp.llama_vocab_type(draft):
        raise differ("its tokenizer is of another kind")
    for name, add, token in (("BOS", llama_cpp.llama_vocab_get_add_bos, llama_cpp.llama_vocab_bos),
                             ("EOS", llama_cpp.llama_vocab_get_add_eos, llama_cpp.llama_vocab_eos)):
        if add(target) != add(draft) or (add(target) and token(target) != token(draft)):
            raise differ(f"its {name} token differs")
    n_target, n_draft = llama_cpp.llama_vocab_n_tokens(target), llama_cpp.llama_vocab_n_tokens(draft)
    if abs(n_target - n_draft) > VOCAB_SIZE_SLACK:
        raise differ(f"its vocabulary has {n_draft} tokens against the model's {n_target}")
    for token in range(FIRST_CHECKED_TOKEN, min(n_target, n_draft)):
        if llama_cpp.llama_vocab_get_text(target, token) != llama_cpp.llama_vocab_get_text(draft, token):
            raise differ(f"token {token} is another word in it")


class Drafter:
    """Drafts for the scheduler's slots in the draft model's own context (one sequence per slot)."""

    def __init__(self, model: object, context: object, options: DraftOptions) -> None:
        self._context, self.options = context, options
        self._memory = llama_cpp.llama_get_memory(context)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self._n_batch = llama_cpp.llama_n_batch(context)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._cached: dict[int, list[int]] = {}  # each sequence's tokens in the draft's cache

    def draft(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """For each sequence, `wants[seq]` = (its tokens so far, how many to draft at most): the drafted tokens that
        follow them. Nothing for any sequence where the draft's cache ran out of room (it starts over next time)."""
        if not wants:
            return {}
        try:
            last = self._read({seq: tokens for seq, (tokens, _) in wants.items()})
            drafted: dict[int, list[int]] = {seq: [] for seq in wants}
            while last:
                going = {}
                for seq, index in last.items():
                    token, probability = self._best(index)
                    if probability < self.options.p_min:
                        continue
                    drafted[seq].append(token)
                    if len(drafted[seq]) < wants[seq][1]:
                        going[seq] = [token]
                last = self._decode(going) if going else {}
        except _Full:
            llama_cpp.llama_memory_clear(self._memory, True)
            self._cached.clear()
            return {}
        return {seq: tokens for seq, tokens in drafted.items() if tokens and len(tokens) >= self.options.n_min}

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)

    def _read(self, tokens: dict[int, list[int]]) -> dict[int, int]:
        """Bring each sequence's cache up to its tokens; the batch index of each one's last token's logits."""
        pending = {}
        for seq, wanted in tokens.items():
            cached = self._cached.get(seq, [])
            keep = min(common_prefix(cached, wanted), len(wanted) - 1)  # the last token is read again for its logits
            if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
                llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)  # this cache cannot be cut there: start over
                keep = 0
            self._cached[seq] = wanted[:keep]
            pending[seq] = wanted[keep:]
        last: dict[int, int] = {}
        while any(pending.values()):
            room, chunk = self._n_batch, {}
            for seq, rest in pending.items():
                chunk[seq], pending[seq] = rest[:room], rest[room:]
                room -= len(chunk[seq])
            last.update(self._decode({seq: part for seq, part in chunk.items() if part}, final={s for s, r in pending.items() if not r}))
        return last

    def _decode(self, tokens: dict[int, list[int]], final: set[int] | None = None) -> dict[int, int]:
        """Decode each sequence's `tokens` after what its cache holds; the batch index of the last token of each
        sequence in `final` (all of them by default), whose logits are kept."""
        batch, n, last = self._batch, 0, {}
        for seq, part in tokens.items():
            cached = self._cached[seq]
            for i, token in enumerate(part):
                logits = i == len(part) - 1 and (final is None or seq in final)
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, len(cached), 1, logits
                batch.seq_id[n][0] = seq
                cached.append(token)
                if logits:
                    last[seq] = n
                n += 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._context, batch)
        if status == 1:  # no room in the cache for this batch
            raise _Full
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} in the draft model")
        return last

    def _best(self, index: int) -> tuple[int, float]:
        """The draft model's most likely next token at batch `index`, and its probability among its TOP_K best."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._context, index), shape=(self._n_vocab,))
        top = np.argpartition(-logits, TOP_K)[:TOP_K]
        best = int(top[np.argmax(logits[top])])
        weights = np.exp(logits[top] - logits[best])
        return best, float(1.0 / weights.sum())


class _Full(Exception):
    """The draft context's cache has no room for a batch."""

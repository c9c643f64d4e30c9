"""Slots and continuous batching: several sequences decoded together in one llama.cpp context.

Modelled on how llama.cpp's own server schedules its slots. The context holds `parallel`
sequences, which share one KV cache (any one may use all of it), or each have their own part of it
(--ctx-per-slot). In a shared cache, a new request first moves the idle slots' prompts out of it into
memory (prompt_cache.py), and starts only when its prompt fits beside what the running requests hold,
so a prompt being read always has its cells; when the generating requests together fill the cache,
the one holding most ends with "length", as it would at the end of its own context. With context
shifting (--context-shift, as llama-server's), a request that fills its context (or the shared
cache) instead drops the oldest half of what follows its first n_keep tokens, and goes on.
One thread owns the
context and loops: every step is one `llama_decode` over a batch holding the next token of every
generating sequence plus a chunk of any prompt being read (prompts are read in chunks, so a long
prompt does not stall the others). A new request goes to the free slot whose cached tokens share
the longest prefix with its prompt, and only the rest is read. Requests beyond the slots wait in
order, up to a bound; each request's pieces go to its own queue, which its reader drains.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import llama_cpp
import numpy as np

from runtime.engine.draft import Drafter
from runtime.engine.lora import Adapters, Scales
from runtime.engine.metrics import Metrics
from runtime.engine.prompt_cache import PromptCache, common_prefix
from runtime.engine.reasoning import Splitter
from runtime.engine.sampling import SamplerChain, Sampling, SamplingError
from runtime.engine import slot_files
from runtime.engine.slot_files import SlotFile, SlotFileError
from runtime.engine.text import TextStream
from runtime.errors import LlamaboxError



T = TypeVar("T")


class PromptError(LlamaboxError):
    """A prompt the model cannot read (empty, or with tokens outside its vocabulary)."""


class QueueFullError(LlamaboxError):
    """Every slot is busy and the waiting line is full."""


class EngineFailure(LlamaboxError):
    """llama.cpp failed to evaluate a batch (not the user's doing: the HTTP server answers 500)."""


class DeviceLost(LlamaboxError):
    """A device the model runs on is gone (an RPC worker dropped out): every request fails, the HTTP server answers
    503, and the model starts again on what is left."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the most likely alternatives."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class Timings:
    """How long a request took: reading the prompt (up to the first token) and generating the rest."""

    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    draft_n: int = 0  # tokens a draft model guessed for the request (speculative decoding)
    draft_n_accepted: int = 0  # of which the model chose the same


@dataclass(frozen=True)
class Chunk:
    """A piece of generated text; the last one of a stream carries the finish reason and the counts.

    `logprobs` holds the tokens generated since the previous piece (when the request asked for them).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    timings: Timings | None = None
    stop_word: str | None = None  # the stop string that ended the text (finish_reason "stop")
    context_dropped: int = 0  # tokens dropped from the request's context by context shifts
    messages_dropped: int = 0  # the chat's oldest messages left out of the prompt (--truncate-prompt)


class _Request:
    def __init__(
        self, tokens: list[int], sampling: Sampling, stop: list[str], messages_dropped: int = 0, lora: Scales = (), thinking_open: bool = False
    ) -> None:
        self.tokens, self.sampling, self.stop, self.messages_dropped, self.lora = tokens, sampling, stop, messages_dropped, lora
        self.thinking_open = thinking_open  # the prompt opened a reasoning block (reasoning.thinking_open)
        self.pieces: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        self.cancelled = False
        self.listener: Callable[[], None] | None = None  # told after each piece (an asyncio reader's wake-up)

    def put(self, piece: Chunk | BaseException) -> None:
        """Hand a piece to the reader; never raises (the engine thread calls it)."""
        self.pieces.put(piece)
        if self.listener is not None:
            try:
                self.listener()
            except RuntimeError:  # the reader's event loop is closed: nobody will read this request
                self.cancelled = True


class _Stream:
    """A request's pieces as an iterator. Closing it, even before the first piece, cancels the request."""

    def __init__(self, request: _Request, cancel: Callable[[_Request], None]) -> None:
        self._request, self._cancel, self._done = request, cancel, False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        return self._take(self._request.pieces.get())

    def _take(self, piece: Chunk | BaseException) -> Chunk:
        if isinstance(piece, BaseException):
            self._done = True
            raise piece
        if piece.finish_reason is not None:
            self._done = True
        return piece

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._cancel(self._request)

    def __del__(self) -> None:
        self.close()


class _AsyncStream(_Stream):
    """The same for an asyncio reader: waits without holding a thread (the engine thread wakes it)."""

    def __init__(self, request: _Request, cancel: Callable[[_Request], None]) -> None:
        import asyncio  # here, not at the top: -p and --chat never stream to asyncio, and it costs them 10 ms

        super().__init__(request, cancel)
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        self._ready = ready
        # Only the event, not this stream: the engine must not keep an abandoned stream alive, so that
        # its __del__ can cancel the request.
        request.listener = lambda: loop.call_soon_threadsafe(ready.set)

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        while not self._done:
            try:
                return self._take(self._request.pieces.get_nowait())
            except queue.Empty:
                self._ready.clear()
                if self._request.pieces.empty():  # nothing came between the two looks: wait to be told
                    await self._ready.wait()
        raise StopAsyncIteration


class _Slot:
    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.cached: list[int] = []  # tokens whose keys and values are in this sequence's cache
        self.request: _Request | None = None
        self.pending: list[int] = []  # prompt tokens still to read
        self.sampler: SamplerChain | None = None
        self.text: TextStream | None = None
        self.next_token: int | None = None  # sampled, not yet in the cache
        self.generated = 0
        self.reused = 0
        self.dropped = 0  # tokens context shifts dropped from this request's context
        self.lora: Scales = ()  # the LoRA scales `cached` was computed with
        self.reasoning: Splitter | None = None  # follows the reply's <think> block while a reasoning budget holds
        self.thought = 0  # tokens generated inside that block
        self.forced: list[int] = []  # tokens that replace the next ones sampled (the end of the reasoning block)
        self.drafted: list[int] = []  # this step's draft, decoded after next_token, to check against the model's choices
        self.draft_n = self.draft_n_accepted = 0
        self.logprobs: list[TokenLogprob] = []  # generated since the last piece sent
        self.started_at = self.first_token_at = 0.0
        self.batch_index = -1
        self.last_used = 0  # when it last took a request, to reuse the least recently used slot first


@dataclass(frozen=True)
class SlotState:
    id: int
    n_ctx: int
    is_processing: bool
    cached_tokens: int
    speculative: bool = False  # a draft model guesses for it
    draft_n: int = 0  # its request's guesses so far (the last request's, when idle), and those the model took
    draft_n_accepted: int = 0


class Scheduler:
    def __init__(
        self, model: object, context: object, n_ctx_slot: int, parallel: int, n_batch: int, n_ubatch: int, max_waiting: int,
        shared_cells: int | None = None, prompt_cache_bytes: int = 0, context_shift: bool = False, n_keep: int = 0,
        adapters: Adapters | None = None, end_of_thinking: list[int] | None = None, drafter: Drafter | None = None,
    ) -> None:
        self._model, self._context = model, context
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._n_swa = llama_cpp.llama_model_n_swa(model)
        self._memory = llama_cpp.llama_get_memory(context)
        self.n_ctx_slot, self._n_batch, self._max_waiting = n_ctx_slot, n_batch, max_waiting
        # Prompt tokens per step while other sequences are generating: one compute step's worth, as llama-server.
        self._prompt_chunk = n_ubatch
        # Context shifting, where the model's cache can move tokens (not a sliding-window or recurrent one).
        self.context_shift = context_shift and bool(llama_cpp.llama_memory_can_shift(self._memory))
        self._n_keep, self._add_bos = n_keep, bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._adapters = adapters  # LoRA: one set of scales per decode call
        self._end_of_thinking = end_of_thinking or []  # what closes a reasoning block when its budget is spent
        self._drafter = drafter  # speculative decoding: a draft model's guesses, checked in the same decode call
        self._last_lora: Scales | None = None
        self._shared_cells = shared_cells  # the shared cache's size; None: each slot has n_ctx_slot cells of its own
        # With a shared cache, idle slots' prompts wait in memory rather than in it (prompt_cache.py).
        self._parked = PromptCache(context, prompt_cache_bytes) if shared_cells is not None else None
        self._slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[_Request] = collections.deque()
        # Work on a slot's cache (saving, restoring, erasing it) waiting for the slot to be idle, as llama-server defers it.
        self._idle_work: list[tuple[_Slot, Callable[[_Slot], object], concurrent.futures.Future[object]]] = []
        self._requests_started = 0
        self._metrics = Metrics()
        self._wake = threading.Condition()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._stopping = False
        self._lost: DeviceLost | None = None  # set once a device is gone: nothing more is served
        self._thread = threading.Thread(target=self._loop, name="llamabox-engine", daemon=True)
        self._thread.start()

    # --- called by readers, on their own threads ---------------------------------------------------

    def submit(
        self, tokens: list[int], sampling: Sampling, stop: list[str], asynchronous: bool = False, messages_dropped: int = 0, lora: Scales = (),
        thinking_open: bool = False,
    ) -> _Stream:
        """Queue a request; its pieces come from the returned iterator (an async one if `asynchronous`,
        which must be asked for in the event loop). Closing it cancels the request. `messages_dropped` (what
        --truncate-prompt left out of the chat) is handed back with the last piece."""
        if not tokens:
            raise PromptError("the prompt is empty; send some text")
        outside = next((t for t in tokens if not 0 <= t < self._n_vocab), None)
        if outside is not None:
            raise PromptError(f"the prompt holds token {outside}, outside the model's vocabulary of {self._n_vocab} tokens")
        if self._lost is not None:
            raise self._lost
        SamplerChain(sampling, self._vocab, self._n_vocab).close()  # refuse bad settings now, not mid-stream
        request = _Request(tokens, sampling, stop, messages_dropped, lora, thinking_open)
        with self._wake:
            # Requests not yet given a slot count against the free slots first, then against the line.
            waiting = len(self._waiting) - sum(slot.request is None for slot in self._slots)
            if waiting >= self._max_waiting:
                raise QueueFullError(f"all {len(self._slots)} slots are busy and {waiting} requests are waiting; try again shortly")
            self._waiting.append(request)
            self._wake.notify()
        return (_AsyncStream if asynchronous else _Stream)(request, self._cancel)

    def _cancel(self, request: _Request) -> None:
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def state(self) -> tuple[list[SlotState], int]:
        with self._wake:
            slots = [
                SlotState(s.id, self.n_ctx_slot, s.request is not None, len(s.cached), self._drafter is not None, s.draft_n, s.draft_n_accepted)
                for s in self._slots
            ]
            return slots, len(self._waiting)

    def save_slot(self, slot_id: int, path: Path) -> SlotFile:
        """Save the slot's cached tokens and their keys and values to `path` (once the slot is idle)."""
        return self._when_idle(slot_id, lambda slot: slot_files.save(self._context, slot.id, slot.cached, path))

    def restore_slot(self, slot_id: int, path: Path) -> SlotFile:
        """Put a saved slot's cache back into the slot (once it is idle); the next request that starts as it did reuses it."""

        def restore(slot: _Slot) -> SlotFile:
            slot.cached = []
            capacity = self.n_ctx_slot if self._shared_cells is None else min(self.n_ctx_slot, self._free_cells())
            slot.cached, done = slot_files.restore(self._context, slot.id, path, capacity, self._n_vocab)
            slot.lora = tuple(self._adapters.scales) if self._adapters is not None else ()
            return done

        return self._when_idle(slot_id, restore)

    def erase_slot(self, slot_id: int) -> int:
        """Empty the slot's cache (once it is idle); how many tokens it held."""

        def erase(slot: _Slot) -> int:
            held = len(slot.cached)
            self._drop_cache(slot)
            return held

        return self._when_idle(slot_id, erase)

    def _when_idle(self, slot_id: int, work: Callable[[_Slot], T]) -> T:
        if not 0 <= slot_id < len(self._slots):
            raise SlotFileError("Invalid slot ID")
        done: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._wake:
            if self._stopping:
                raise SlotFileError("the server is stopping")
            self._idle_work.append((self._slots[slot_id], work, done))
            self._wake.notify()
        return done.result()  # type: ignore[return-value]

    def _do_idle_work(self) -> None:
        """The slot work whose slot has no request now (under the lock, on the engine thread)."""
        for item in [item for item in self._idle_work if item[0].request is None]:
            slot, work, done = item
            self._idle_work.remove(item)
            try:
                done.set_result(work(slot))
            except Exception as exc:  # handed to the caller, whose request answers with it
                done.set_exception(exc)

    def metrics(self) -> Metrics:
        """The counters for /metrics (their recent averages start over)."""
        with self._wake:
            return self._metrics.read()

    # --- the engine thread --------------------------------------------------------------------------

    def stop(self) -> None:
        """End the engine thread after its current step; what is still generating is cancelled.

        Must come before the context and the model are freed: a step running while they are freed
        (at interpreter exit, say) crashes in llama.cpp.
        """
        with self._wake:
            self._stopping = True
            for request in [*self._waiting, *(slot.request for slot in self._slots if slot.request)]:
                request.put(Chunk("", "cancelled"))
            for _, _, done in self._idle_work:
                done.set_exception(SlotFileError("the server is stopping"))
            self._idle_work = []
            self._wake.notify()
        self._thread.join()
        for slot in self._slots:
            if slot.sampler is not None:
                slot.sampler.close()
        llama_cpp.llama_batch_free(self._batch)
        if self._drafter is not None:
            self._drafter.close()

    def fail_everything(self, lost: DeviceLost) -> None:
        """End every request with `lost`, and refuse new ones with it. Called from any thread, also while the engine
        thread is stuck in llama.cpp (waiting on a worker that is gone): where that thread holds the lock, the
        requests are failed without it (the process ends right after)."""
        held = self._wake.acquire(timeout=1.0)
        try:
            self._lost = lost
            for request in [*self._waiting, *(slot.request for slot in self._slots if slot.request)]:
                request.put(lost)
            for _, _, done in self._idle_work:
                if not done.done():
                    done.set_exception(lost)
        finally:
            if held:
                self._wake.release()

    def _loop(self) -> None:
        while True:
            try:
                with self._wake:
                    self._drop_cancelled()
                    self._assign_waiting()
                    self._do_idle_work()
                    while not self._stopping and not any(slot.request for slot in self._slots):
                        self._wake.wait()
                        self._drop_cancelled()
                        self._assign_waiting()
                        self._do_idle_work()
                    if self._stopping:
                        return
                self._step()
            except Exception as exc:  # a failed step ends the requests in it, never the engine
                with self._wake:
                    for slot in self._slots:
                        if slot.request is not None:
                            slot.request.put(EngineFailure(str(exc)))
                            self._free(slot, keep_cache=False)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            request.put(Chunk("", "cancelled"))  # wakes a reader still blocked elsewhere
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        for slot in self._slots:
            if slot.request is not None and slot.request.cancelled:
                slot.request.put(Chunk("", "cancelled"))
                self._free(slot, keep_cache=True)

    def _assign_waiting(self) -> None:
        while self._waiting:
            free = [slot for slot in self._slots if slot.request is None]
            if not free:
                return
            request = self._waiting[0]
            slot = max(free, key=lambda s: (_reusable(s, request), -s.last_used))
            if self._parked is not None:
                self._park_idle_slots(request, slot)
            if not self._room_for(request, slot):
                return  # it waits, first in line, until the requests running now free their cells
            self._waiting.popleft()
            try:
                self._start(slot, request)
            except Exception as exc:  # this request cannot start; the others go on
                request.put(EngineFailure(str(exc)))
                self._free(slot, keep_cache=False)

    def _start(self, slot: _Slot, request: _Request) -> None:
        keep = min(_reusable(slot, request), len(request.tokens) - 1)  # read at least one token
        cut = llama_cpp.llama_memory_seq_rm(self._memory, slot.id, keep, -1)
        # A sliding-window cache has already dropped what lies before the window: reuse needs it whole.
        if not cut or (self._n_swa > 0 and keep > 0 and llama_cpp.llama_memory_seq_pos_min(self._memory, slot.id) > max(0, keep - self._n_swa)):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.id, -1, -1)  # this cache cannot be cut here: start over
            keep = 0
        slot.cached, slot.pending, slot.lora = request.tokens[:keep], request.tokens[keep:], request.lora
        slot.reused, slot.generated, slot.next_token, slot.dropped = keep, 0, None, 0
        slot.logprobs, slot.started_at, slot.first_token_at = [], time.perf_counter(), 0.0
        self._requests_started += 1
        slot.last_used = self._requests_started
        slot.sampler = SamplerChain(request.sampling, self._vocab, self._n_vocab)
        for token in request.tokens:
            slot.sampler.accept_prompt(token)
        slot.text = TextStream(request.stop)
        slot.reasoning, slot.thought, slot.forced = None, 0, []
        slot.draft_n = slot.draft_n_accepted = 0
        budget = request.sampling.reasoning_budget
        if budget >= 0 and self._end_of_thinking and request.sampling.grammar is None:  # a grammar decides every token itself
            slot.reasoning = Splitter(request.thinking_open)
            if budget == 0 and request.thinking_open:
                slot.forced, slot.reasoning = list(self._end_of_thinking), None
        slot.request = request

    def _park_idle_slots(self, request: _Request, slot: _Slot) -> None:
        """Move the prompts of the idle slots but `slot` out of the shared cache into memory, and put back in `slot`
        the parked prompt that shares the longest start with `request`, when that is longer than `slot`'s own."""
        assert self._parked is not None
        for idle in self._slots:
            if idle.request is None and idle is not slot and idle.cached:
                self._parked.park(idle.id, idle.cached, idle.lora)
                self._drop_cache(idle)
        own = _reusable(slot, request)
        if own < len(slot.cached) // 2:
            # The request keeps less than half of this slot's prompt (another chat with the same system message):
            # keep a copy of the whole in memory before _start cuts it, for that chat's next turn.
            self._parked.park(slot.id, slot.cached, slot.lora)
        parked, shared = self._parked.best(request.tokens, request.lora)
        if parked is None or shared <= own:
            return
        if len(parked.tokens) - len(slot.cached) > self._free_cells():
            return  # no room for it beside the requests running now: read the prompt again
        if slot.cached:
            self._drop_cache(slot)  # kept in memory above when worth it
        if self._parked.restore(parked, slot.id):
            slot.cached, slot.lora = parked.tokens, parked.lora
        else:
            self._drop_cache(slot)

    def _free_cells(self) -> int:
        """Cells of the shared cache that hold no token and are not promised to a prompt being read."""
        assert self._shared_cells is not None
        return self._shared_cells - sum(len(s.cached) + len(s.pending) for s in self._slots)

    def _room_for(self, request: _Request, slot: _Slot) -> bool:
        """Whether `request` fits the shared cache on `slot` (its prompt and one token) beside the running requests;
        the idle slots' prompts are parked already (_park_idle_slots)."""
        if self._shared_cells is None:
            return True
        keep = min(_reusable(slot, request), len(request.tokens) - 1)
        freed_on_slot = len(slot.cached) - keep  # what _start cuts from the chosen slot's own cache
        return self._free_cells() + freed_on_slot >= len(request.tokens) - keep + 1

    def _make_room_to_generate(self, generating: list[_Slot]) -> list[_Slot]:
        """Room in the shared cache for one more token of each generating slot: idle slots' caches go first, then
        the request holding most ends with "length". The slots that still generate."""
        if self._shared_cells is None:
            return generating
        for idle in sorted((s for s in self._slots if s.request is None and s.cached), key=lambda s: s.last_used):
            if self._free_cells() >= len(generating):
                break
            self._drop_cache(idle)
        while generating and self._free_cells() < len(generating):
            longest = max(generating, key=lambda s: len(s.cached))
            if self._shift(longest):
                continue
            generating.remove(longest)
            self._finish(longest, "length", longest.text.flush() if longest.text is not None else "", keep_cache=False)
        return generating

    def _discard(self, slot: _Slot) -> tuple[int, int]:
        """What a context shift of `slot` keeps and drops, as llama-server computes it: the first n_keep tokens (the
        request's, else --keep; -1: its whole prompt; the BOS token besides, where the model adds one), then the older
        half of the rest."""
        assert slot.request is not None
        n_keep = slot.request.sampling.n_keep if slot.request.sampling.n_keep is not None else self._n_keep
        n_keep = len(slot.request.tokens) if n_keep < 0 else n_keep + self._add_bos
        n_keep = max(0, min(self.n_ctx_slot - 4, n_keep))
        n_left = len(slot.cached) - n_keep
        return n_keep, max(0, min(n_left // 2, n_left - 1))

    def _shift(self, slot: _Slot) -> bool:
        """Shift `slot`'s context: drop _discard's tokens from its cache and move those after them back, so that it
        can go on generating. False where context shifting is off or nothing can be dropped."""
        if not self.context_shift or slot.request is None:
            return False
        n_keep, n_discard = self._discard(slot)
        if n_discard <= 0:
            return False
        llama_cpp.llama_memory_seq_rm(self._memory, slot.id, n_keep, n_keep + n_discard)
        llama_cpp.llama_memory_seq_add(self._memory, slot.id, n_keep + n_discard, len(slot.cached), -n_discard)
        slot.cached = slot.cached[:n_keep] + slot.cached[n_keep + n_discard:]
        slot.dropped += n_discard
        return True

    def _drop_cache(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.id, -1, -1)
        slot.cached = []

    def _free(self, slot: _Slot, keep_cache: bool) -> None:
        if slot.sampler is not None:
            slot.sampler.close()
        if not keep_cache:
            self._drop_cache(slot)
        slot.request, slot.sampler, slot.text, slot.pending, slot.next_token = None, None, None, [], None

    def _step(self) -> None:
        batch, n = self._batch, 0
        with self._wake:
            for slot in self._slots:
                if slot.request is not None and slot.next_token is not None and len(slot.cached) + 1 >= self.n_ctx_slot:
                    self._shift(slot)  # _sampled let it go on only where it can
            self._make_room_to_generate([slot for slot in self._slots if slot.request is not None and slot.next_token is not None])
        active = self._this_steps_lora([slot for slot in self._slots if slot.request is not None])
        generating = [slot for slot in active if slot.next_token is not None]
        if not active:
            return
        self._draft(generating)
        for slot in generating:
            self._add(n, slot.next_token, len(slot.cached), slot.id, True)
            slot.cached.append(slot.next_token)
            slot.batch_index, n = n, n + 1
            for i, token in enumerate(slot.drafted):  # the model's choice after each is sampled below
                self._add(n + i, token, len(slot.cached) + i, slot.id, True)
            n += len(slot.drafted)
        budget = self._n_batch - n if not generating else min(self._prompt_chunk, self._n_batch - n)
        for slot in active:
            if slot.next_token is not None or budget <= 0:
                continue
            chunk = slot.pending[:budget]
            slot.pending = slot.pending[len(chunk):]
            for i, token in enumerate(chunk):
                last = not slot.pending and i == len(chunk) - 1
                self._add(n, token, len(slot.cached), slot.id, last)
                slot.cached.append(token)
                if last:
                    slot.batch_index = n
                n += 1
            budget -= len(chunk)
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        with self._wake:
            self._metrics.decoded(len(active), max(len(slot.cached) for slot in active))
        for slot in active:
            if slot.batch_index >= 0 and slot.request is not None:
                self._sample(slot)
            slot.batch_index, slot.drafted = -1, []

    def _sample(self, slot: _Slot) -> None:
        """The slot's next token from this step's logits; then, while the model chose what the draft guessed, the next
        after each guess (whose keys and values the step computed already). Each token is sampled by the request's
        own chain, exactly as without a draft, so the text is the same: a draft only saves decode calls."""
        assert slot.request is not None
        slot.draft_n += len(slot.drafted)  # counted before the request can end below, so that its timings have them
        accepted = 0
        for i in range(len(slot.drafted) + 1):
            try:
                if slot.forced:  # the reasoning budget is spent: the block's end, not a sampled token
                    token = slot.forced.pop(0)
                    slot.sampler.accept(token)  # type: ignore[union-attr]
                else:
                    token = slot.sampler.sample(self._context, slot.batch_index + i)  # type: ignore[union-attr]
            except SamplingError as exc:  # this request's grammar has no way on: it ends, the others go on
                with self._wake:
                    slot.request.put(exc)
                    self._free(slot, keep_cache=False)
                return
            if slot.request.sampling.logprobs is not None and not llama_cpp.llama_vocab_is_eog(self._vocab, token):
                slot.logprobs.append(self._logprob(slot.batch_index + i, token, slot.request.sampling.logprobs))
            self._sampled(slot, token)
            if i == len(slot.drafted) or slot.request is None or slot.forced or token != slot.drafted[i]:
                break
            slot.cached.append(token)  # the guess was right: go on from it
            slot.next_token, accepted, slot.draft_n_accepted = None, accepted + 1, slot.draft_n_accepted + 1
        if slot.drafted:
            # The cells of the guesses not taken (or of all, where the request ended) are free again.
            llama_cpp.llama_memory_seq_rm(self._memory, slot.id, len(slot.cached), -1)
            with self._wake:
                self._metrics.drafted(len(slot.drafted), accepted)

    def _draft(self, generating: list[_Slot]) -> None:
        """Each generating slot's guesses for this step (slot.drafted): as many as the draft settings, the batch, the
        slot's context, the free cells of a shared cache and the request's token limit leave room for."""
        if self._drafter is None:
            return
        for slot in generating:
            slot.drafted = []
        options, room = self._drafter.options, self._n_batch - len(generating)
        spare = self._free_cells() - len(generating) if self._shared_cells is not None else room
        wants = {}
        for slot in generating:
            assert slot.request is not None and slot.next_token is not None
            limit = slot.request.sampling.max_tokens
            n = min(options.n_max, room, spare, self.n_ctx_slot - len(slot.cached) - 3)
            if limit is not None and limit > 0:
                n = min(n, limit - slot.generated - 1)
            if slot.forced or n < max(options.n_min, 1):
                continue
            wants[slot.id] = ([*slot.cached, slot.next_token], n)
            room, spare = room - n, spare - n
        for slot_id, tokens in self._drafter.draft(wants).items():
            self._slots[slot_id].drafted = tokens

    def _this_steps_lora(self, active: list[_Slot]) -> list[_Slot]:
        """The requests of this step: those with one set of LoRA scales (llama.cpp applies one per decode call), the
        sets taking turns step by step; the context set to compute with it."""
        if self._adapters is None or not active:
            return active
        kinds = sorted({slot.lora for slot in active})
        later = [kind for kind in kinds if self._last_lora is not None and kind > self._last_lora]
        self._last_lora = later[0] if later else kinds[0]
        self._adapters.apply(self._context, self._last_lora)
        return [slot for slot in active if slot.lora == self._last_lora]

    def _add(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq

    def _logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """The token's log-probability from the raw logits (before penalties, grammar and temperature, as OpenAI reports them)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._context, index), shape=(self._n_vocab,))
        top = min(top, self._n_vocab - 1)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argpartition(-logprobs, top)[:top] if top else np.array([], dtype=int)
        best = best[np.argsort(-logprobs[best])]
        return TokenLogprob(
            token, token_bytes(self._vocab, token), float(logprobs[token]),
            tuple((int(t), token_bytes(self._vocab, int(t)), float(logprobs[t])) for t in best),
        )

    def _sampled(self, slot: _Slot, token: int) -> None:
        request, text = slot.request, slot.text
        assert request is not None and text is not None
        if not slot.first_token_at:
            slot.first_token_at = time.perf_counter()
        finish = None
        piece = ""
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            finish = "stop"
        else:
            slot.generated += 1
            piece = text.feed(token_bytes(self._vocab, token))
            self._follow_reasoning(slot, piece)
            limit = request.sampling.max_tokens
            if text.stopped:
                finish = "stop"
            elif (limit is not None and limit > 0 and slot.generated >= limit) or (
                len(slot.cached) + 1 >= self.n_ctx_slot and not (self.context_shift and limit and self._discard(slot)[1] > 0)
            ):
                # A reply is shifted only when it has a token limit: without one it could go on for ever (llama-server
                # stops such a reply at the end of its context too).
                finish = "length"
        if finish is None:
            slot.next_token = token
            if piece:
                request.put(Chunk(piece, logprobs=tuple(slot.logprobs)))
                slot.logprobs = []
            return
        if not text.stopped:
            piece += text.flush()
        with self._wake:
            self._finish(slot, finish, piece, keep_cache=True)

    def _follow_reasoning(self, slot: _Slot, piece: str) -> None:
        """Count the tokens of the reply's reasoning block; once its budget is spent, close the block (llama-server's
        --reasoning-budget): the tokens of its end replace the next ones sampled."""
        if slot.reasoning is None or slot.request is None:
            return
        slot.reasoning.feed(piece)
        if not slot.reasoning.thinking:
            return
        slot.thought += 1
        # A block the reply opened itself counts its opening token too.
        if slot.thought >= slot.request.sampling.reasoning_budget + (0 if slot.request.thinking_open else 1):
            slot.forced, slot.reasoning = list(self._end_of_thinking), None

    def _finish(self, slot: _Slot, finish: str, piece: str, keep_cache: bool) -> None:
        """End the slot's request with its last piece, its finish reason and its counts."""
        request, text = slot.request, slot.text
        assert request is not None and text is not None
        now = time.perf_counter()
        first = slot.first_token_at or now
        timings = Timings((first - slot.started_at) * 1000, (now - first) * 1000, slot.draft_n, slot.draft_n_accepted)
        request.put(
            Chunk(
                piece, finish, len(request.tokens), slot.generated, slot.reused, tuple(slot.logprobs), timings, text.stop_word, slot.dropped,
                request.messages_dropped,
            )
        )
        self._metrics.request_done(
            len(request.tokens) - slot.reused, slot.reused, timings.prompt_ms / 1000, slot.generated, timings.predicted_ms / 1000
        )
        self._free(slot, keep_cache=keep_cache)




def _reusable(slot: _Slot, request: _Request) -> int:
    """How many of `request`'s first tokens `slot` holds already, computed with the LoRA scales the request wants."""
    return common_prefix(slot.cached, request.tokens) if slot.lora == request.lora else 0


def token_bytes(vocab: object, token: int) -> bytes:
    """The token's text as bytes (special tokens are not rendered as text)."""
    buffer = (ctypes.c_char * 64)()
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    if n < 0:  # longer than the buffer: llama.cpp says how long
        buffer = (ctypes.c_char * -n)()
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    return buffer.raw[:n]

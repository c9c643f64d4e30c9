"""The engine: the single owner of the llama.cpp model and context.

Every front end (HTTP dialects, `-p`, the browser chat) goes through `Engine`; none of them sees
llama-cpp-python. The model is mapped in place from the bundle (loader.py); one context holds
`parallel` sequences that decode together (scheduler.py), each request with its own sampler chain
(sampling.py) and text stream (text.py); embeddings have a context of their own (embeddings.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp

from runtime.cache_plan import CachePlan, plan_cache
from runtime.cache_types import UNQUANTIZED
from runtime.engine import memory, prompt_cache, reasoning, templates
from runtime.engine.draft import Drafter, DraftOptions, check_compatible
from runtime.engine.embeddings import Embedder, EmbeddingError
from runtime.engine.rerank import Reranker, RerankError, check_reranker
from runtime.engine.slot_files import SlotFile, SlotFileError, valid_filename
from runtime.engine.infill import FimTokens
from runtime.engine.templates import ChatTemplateError, TemplateChoice, render_chat
from runtime.engine.loader import InPlaceModel
from runtime.engine.metrics import Metrics
from runtime.engine.sampling import Sampling, SamplingError
from runtime.engine.scheduler import (
    Chunk,
    DeviceLost,
    EngineFailure,
    PromptError,
    QueueFullError,
    Scheduler,
    SlotState,
    Timings,
    TokenLogprob,
    token_bytes,
)
from runtime.errors import LlamaboxError, ModelFileError
from runtime.model_source import ModelLocation
from runtime.engine.lora import Adapters, LoraError, LoraFile
from runtime.engine.quiet import quiet

__all__ = [
    "ChatTemplateError", "Chunk", "Completion", "DeviceLost", "DraftOptions", "EmbeddingError", "Engine", "EngineFailure", "EngineOptions", "LoraError", "LoraFile",
    "Metrics", "Prompt",
    "PromptError", "PromptTooLongError", "QueueFullError", "RerankError", "SlotFile", "SlotFileError", "valid_filename", "Sampling", "SamplingError", "SlotState", "Timings",
    "TokenLogprob",
]

# llama-server's batch sizes: prompts are evaluated up to 2048 tokens per step, 512 per ubatch.
N_BATCH, N_UBATCH = 2048, 512


def flash_attention(choice: str, gpu_layers: int, n_layer: int, cache_type_v: str) -> int:
    """llama.cpp's flash-attention setting for `choice` (-fa). auto: on where a GPU holds every layer (and where a
    quantized V cache needs it), off on the CPU, as llamafile found it best: decoding after 1,400 tokens of context
    ran at 45-52 tok/s off against 27-37 on, for prompts read 10-15 % slower (BENCHMARKS.md, "The GPU")."""
    if choice != "auto":
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if choice == "on" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if gpu_layers > n_layer or cache_type_v not in UNQUANTIZED:
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO  # on where the backend has it, llama-server's default
    return llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


class PromptTooLongError(LlamaboxError):
    """The prompt does not fit into a slot's context window."""


@dataclass(frozen=True)
class EngineOptions:
    ctx_size: int | None = 4096  # tokens of context, shared by the slots; 0: the model's own; None: cache_plan.auto_context
    ctx_per_slot: bool = False  # each slot its own ctx_size tokens (--ctx-per-slot) instead of one cache they share
    parallel: int | None = 1  # sequences decoded together; None: 4, or as many as memory allows with ctx_per_slot (cache_plan.py)
    max_waiting: int = 64  # requests that may wait for a slot before new ones are refused
    threads: int | None = None
    threads_batch: int | None = None  # for reading prompts (-tb); None: as `threads`
    batch_size: int = N_BATCH  # tokens per decode call at most (-b)
    ubatch_size: int = N_UBATCH  # tokens per compute step (-ub); also a prompt's share of a step while others generate
    load_mode: str = "auto"  # loader.LOAD_MODES: how the weights are read (--no-mmap, --mlock, -lm)
    context_shift: bool = False  # a request that fills its context drops older tokens and goes on (--context-shift)
    n_keep: int = 0  # prompt tokens a context shift keeps (--keep; -1: the whole prompt)
    truncate_prompt: bool = False  # a chat too long for the context loses its oldest turns, not its system message
    lora: tuple[LoraFile, ...] = ()  # LoRA adapters to load with the model (--lora, --lora-scaled)
    draft: ModelLocation | None = None  # a draft model of the same vocabulary, for speculative decoding (-md)
    draft_options: DraftOptions = DraftOptions()
    embedding: ModelLocation | None = None  # a model of its own for embeddings (one a bundle carries)
    reranker: ModelLocation | None = None  # a model with a ranking head for /rerank (one a bundle carries)
    reranking: bool = False  # the model itself ranks (llama-server's --reranking)
    gpu_layers: int = 0  # llama.cpp's n_gpu_layers: the model's layers on `gpu_devices`, the output layer counted
    gpu_devices: tuple[int, ...] = ()  # ggml's device indices (runtime.devices); none: the CPU alone
    tensor_split: tuple[float, ...] = ()  # each of gpu_devices' share of the layers; none: llama.cpp's (by free memory)
    system_prompt: str | None = None
    verbose: bool = False
    cache_type_k: str = "f16"  # runtime.cache_types: quantized caches hold more tokens in the same memory
    cache_type_v: str = "f16"
    flash_attn: str = "auto"  # auto, on or off: see flash_attention()
    template: TemplateChoice = TemplateChoice()  # --chat-template and --jinja
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # --chat-template-kwargs, under each request's own


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    timings: Timings = Timings()
    stop_word: str | None = None  # the stop string that ended the text, if one did
    context_dropped: int = 0  # tokens context shifts dropped from the request's context
    messages_dropped: int = 0  # the chat's oldest messages left out of the prompt (--truncate-prompt)

    @classmethod
    def from_pieces(cls, pieces: list[Chunk]) -> Completion:
        """A stream's pieces joined; the last one holds the finish reason and the counts."""
        last = pieces[-1]
        return cls(
            text="".join(p.text for p in pieces),
            finish_reason=last.finish_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            logprobs=tuple(lp for p in pieces for lp in p.logprobs),
            timings=last.timings or Timings(),
            stop_word=last.stop_word,
            context_dropped=last.context_dropped,
            messages_dropped=last.messages_dropped,
        )


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt, with the stop strings its chat template asks for."""

    tokens: list[int]
    stop: list[str] = field(default_factory=list)
    text: str = ""  # what the chat template wrote, for a chat prompt (llama-server's /apply-template shows it)
    messages_dropped: int = 0  # the oldest messages of the chat left out so that it fits (--truncate-prompt)


class Engine:
    def __init__(self, location: ModelLocation, options: EngineOptions) -> None:
        self.options = options
        # llama.cpp's log, through llama-cpp-python's logger: only its errors unless --verbose. It also logs while
        # serving (a LoRA scale change rebuilds the compute graph), where a stderr nobody reads would fill and stall.
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if options.verbose else logging.ERROR)
        self.warnings: list[str] = []  # what the user should read about this load (fewer layers on the GPU)
        self.gpu_layers = options.gpu_layers if options.gpu_devices else 0
        # A compute step takes no more than a decode call does (llama.cpp clamps -ub to -b as well).
        self.batch_size, self.ubatch_size = options.batch_size, min(options.ubatch_size, options.batch_size)
        self._model = self._load(location)
        metadata = self._model.metadata()
        if metadata.get("tokenizer.ggml.model", "none") in ("none", "no_vocab"):
            # llama.cpp loads such a model, then aborts the process at the first tokenization.
            raise ModelFileError(
                f"{location.path.name} holds no tokenizer (tokenizer.ggml.model), so it cannot read or write text; "
                "use a GGUF converted with its tokenizer"
            )
        self.metadata: dict[str, str] = metadata  # the GGUF's key-value metadata, as llama.cpp reads it
        own_template = metadata.get("tokenizer.chat_template")
        self.model_name = metadata.get("general.name") or location.path.stem
        per_token = memory.kv_bytes_per_token(metadata, options.cache_type_k, options.cache_type_v)
        cache = plan_cache(options.ctx_size, options.ctx_per_slot, options.parallel, per_token, self._model.n_ctx_train())
        self.parallel, cells = cache.parallel, cache.cells
        if min(self.batch_size, cells) < self.parallel:
            # Every generating request puts a token into each decode call; llama.cpp aborts the process otherwise.
            self._model.close()
            raise LlamaboxError(
                f"-b {min(self.batch_size, cells)} tokens per decode call cannot hold a token of each of the {self.parallel} "
                f"requests decoded together (-np); give -b at least {self.parallel}"
            )
        context = self._new_context(cells, self.parallel)
        while context is None and self.gpu_layers > 0:
            # The cache and compute buffers of the offloaded layers did not fit on the GPU: fewer layers there.
            self._model.close()
            self._fewer_layers("making the context")
            self._model = self._load(location)
            context = self._new_context(cells, self.parallel)
        if context is None:
            raise ModelFileError(f"llama.cpp could not make a context of {cells} tokens for this model; try a smaller --ctx-size")
        self._context = context
        self.adapters = Adapters(self._model.model, list(options.lora), options.verbose)
        self._draft_model: InPlaceModel | None = None
        self._draft_context: Any = None
        self._embedding_model: InPlaceModel | None = None
        self._reranker_model: InPlaceModel | None = None
        drafter = self._drafter(options.draft, cells) if options.draft is not None else None
        # What llama.cpp made of -b and -ub: it takes no more per call than the context it was asked for (-c 128 gives
        # 128 even where the cache is padded to 256), and a batch beyond that would abort the process.
        self.batch_size, self.ubatch_size = llama_cpp.llama_n_batch(context), llama_cpp.llama_n_ubatch(context)
        # The cache as llama.cpp rounded its cells, and how many one request may use: all of them when shared.
        self.cache = CachePlan(llama_cpp.llama_n_ctx(self._context), self.parallel, shared=not options.ctx_per_slot)
        self.n_ctx = self.cache.per_request
        eos, bos = self._model.token_eos(), self._model.token_bos()
        self._template = templates.choose(
            options.template, own_template,
            eos=self._model.token_get_text(eos) if eos != -1 else "", bos=self._model.token_get_text(bos) if bos != -1 else "",
        )
        # The template in use, as /props and Ollama's /api/show report it; None where chat falls back to ChatML.
        self.chat_template = self._template.source if own_template or options.template.template else None
        self.lost: DeviceLost | None = None  # set by fail_everything: a device the model runs on is gone
        self._lost_watchers: list[Callable[[], None]] = []
        self._scheduler = Scheduler(
            self._model.model, self._context, self.n_ctx, self.parallel, self.batch_size, self.ubatch_size, options.max_waiting,
            shared_cells=self.cache.cells if self.cache.shared else None, prompt_cache_bytes=prompt_cache.default_limit(self.cache.cells * per_token),
            context_shift=options.context_shift, n_keep=options.n_keep, adapters=self.adapters if len(self.adapters) else None,
            end_of_thinking=self.tokenize("\n" + reasoning.CLOSE + "\n\n", add_bos=False), drafter=drafter,
        )
        if options.context_shift and not self._scheduler.context_shift:
            self.warnings.append("this model's cache cannot shift its context (--context-shift); a reply that fills it ends with length")
        # Embeddings: from the embedding model, where one is given, on the CPU (a text at a time), else from this one.
        self._embedding_model = self._load_plain(options.embedding, "embedding") if options.embedding is not None else None
        embedder = self._embedding_model or self._model
        self._embedder = Embedder(
            embedder.model, embedder.metadata(), min(self.n_ctx, embedder.n_ctx_train()), options.threads, options.verbose)
        self.embedding_limit = self._embedder.max_tokens
        self._reranker_model = self._load_plain(options.reranker, "reranker") if options.reranker is not None else None
        self._reranker = self._make_reranker(options.reranker.path.name if options.reranker else location.path.name)

    def _make_reranker(self, name: str) -> Reranker | None:
        """The reranker: the carried or given one, or the model itself with --reranking; none otherwise."""
        model = self._reranker_model or (self._model if self.options.reranking else None)
        if model is None:
            return None
        check_reranker(model.metadata(), name)
        return Reranker(model, self.options.threads, self.options.verbose)

    @property
    def reranks(self) -> bool:
        return self._reranker is not None

    def rerank(self, query: str, documents: list[str]) -> list[tuple[float, int]]:
        """Each document's score against `query`, with the tokens the pair took (a RerankError where one is too long)."""
        assert self._reranker is not None
        pairs = [self._reranker.pair(query, document) for document in documents]
        return [(self._reranker.score(tokens), len(tokens)) for tokens in pairs]

    def _drafter(self, location: ModelLocation, cells: int) -> Drafter:
        """The draft model, on the devices the model is on, and its context: as many sequences as the model's."""
        self._draft_model = self._load_plain(location, "draft", on_gpu=self.gpu_layers > 0)
        check_compatible(self._model.vocab, self._draft_model.vocab, location.path.name)
        params = self._slot_context_params(cells, self.parallel)  # the draft's cache: f16, as llama-server's -ctkd default
        with quiet(self.options.verbose):
            self._draft_context = llama_cpp.llama_init_from_model(self._draft_model.model, params) or None
        if self._draft_context is None:
            raise ModelFileError(f"llama.cpp could not make a context of {cells} tokens for the draft model; try a smaller --ctx-size")
        return Drafter(self._draft_model.model, self._draft_context, self.options.draft_options)

    def _load_plain(self, location: ModelLocation, role: str, on_gpu: bool = False) -> InPlaceModel:
        """A companion model (draft, embedding): wholly on the model's GPUs when `on_gpu`, else on the CPU."""
        try:
            return InPlaceModel(
                location, 1 << 20 if on_gpu else 0, self.options.verbose, self.options.gpu_devices if on_gpu else (),
                load_mode=self.options.load_mode,
            )
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not load the {role} model from {location.path} ({exc})") from None

    def _load(self, location: ModelLocation) -> InPlaceModel:
        """The model with `gpu_layers` on the GPUs; fewer, down to none, while the GPU runs out of memory."""
        while True:
            devices = self.options.gpu_devices if self.gpu_layers > 0 else ()  # no GPU buffers for a CPU-only load
            try:
                return InPlaceModel(
                    location, self.gpu_layers, self.options.verbose, devices, load_mode=self.options.load_mode, tensor_split=self.options.tensor_split,
                )
            except ValueError as exc:
                if self.gpu_layers <= 0:
                    raise ModelFileError(f"llama.cpp could not load the model from {location.path} ({exc})") from None
                self._fewer_layers("loading the weights")

    def _fewer_layers(self, step: str) -> None:
        """Half the layers on the GPU after it ran out of memory in `step` (none, after one)."""
        before, self.gpu_layers = self.gpu_layers, self.gpu_layers // 2
        self.warnings.append(f"the GPU ran out of memory {step} with {before} layers on it; trying {self.gpu_layers}")

    def _slot_context_params(self, n_ctx: int, parallel: int) -> Any:
        """llama.cpp's context parameters for `parallel` slots in `n_ctx` cells: the model's and its draft's."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, self.batch_size, self.ubatch_size
        # One cache shared by the slots (llama-server's default), or each slot its own part of it (--ctx-per-slot).
        params.n_seq_max, params.kv_unified = parallel, not self.options.ctx_per_slot
        params.n_threads = self.options.threads or 0
        params.n_threads_batch = self.options.threads_batch or params.n_threads
        return params

    def _new_context(self, n_ctx: int, parallel: int) -> Any:
        """A context for `parallel` slots, or None where llama.cpp cannot make one (out of memory)."""
        params = self._slot_context_params(n_ctx, parallel)
        params.type_k, params.type_v = memory.GGML_CACHE_TYPES[self.options.cache_type_k], memory.GGML_CACHE_TYPES[self.options.cache_type_v]
        params.flash_attn_type = flash_attention(
            self.options.flash_attn, self.gpu_layers, llama_cpp.llama_model_n_layer(self._model.model), self.options.cache_type_v)
        with quiet(self.options.verbose):
            context = llama_cpp.llama_init_from_model(self._model.model, params)
        return context or None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @property
    def reasons(self) -> bool:
        """Whether the model's chat template is a reasoning model's (it writes or switches a <think> block)."""
        return bool(self.chat_template) and any(mark in self.chat_template for mark in (reasoning.OPEN, "enable_thinking"))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of these tokens; ids outside the vocabulary are a PromptError."""
        n_vocab = self._model.n_vocab()
        outside = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if outside is not None:
            raise PromptError(f"token {outside} is outside the model's vocabulary of {n_vocab} tokens")
        return self.token_text(tokens).decode("utf-8", errors="replace")

    def token_text(self, tokens: list[int]) -> bytes:
        return _text_of(self._model, tokens)

    def fim_tokens(self) -> FimTokens:
        """The model's fill-in-the-middle tokens (runtime/engine/infill.py)."""
        return FimTokens.of(self._model.vocab)

    def text_prompt(self, text: str, add_bos: bool = True) -> Prompt:
        bos = self._model.token_bos()
        return Prompt(tokens=self.tokenize(text, add_bos=add_bos) if text else ([bos] if bos >= 0 else []))

    @property
    def template_knows_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (otherwise callers describe tools in text)."""
        return self._template.takes_tools

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None
    ) -> Prompt:
        """Apply the chat template (or ChatML) to OpenAI-style messages, adding --system-prompt; a last assistant
        message is continued (templates.render_chat).

        `tools` (OpenAI's function tools) go to templates that render them (`template_knows_tools`);
        `template_kwargs` (a request's chat_template_kwargs) over --chat-template-kwargs, to Jinja templates.
        """
        if self.options.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.options.system_prompt}, *messages]
        kwargs = {**self.options.template_kwargs, **(template_kwargs or {})}
        prompt = self._rendered(messages, tools, kwargs)
        if not self.options.truncate_prompt:
            return prompt
        # --truncate-prompt: while the chat leaves less than a quarter of the context for the reply, its oldest whole
        # turns go (each up to the next user message), never the system messages at the start nor the newest turn;
        # if that alone does not fit, _check_fits refuses it as before.
        system = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
        rest, dropped = messages[system:], 0
        while len(prompt.tokens) > self.n_ctx * 3 // 4:
            cut = next((i for i in range(1, len(rest)) if rest[i].get("role") == "user"), None)
            if cut is None:
                break
            rest, dropped = rest[cut:], dropped + cut
            prompt = replace(self._rendered([*messages[:system], *rest], tools, kwargs), messages_dropped=dropped)
        return prompt

    def _rendered(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]) -> Prompt:
        rendered = render_chat(self._template, messages, tools, kwargs)
        # The template writes the BOS token itself where the model wants one.
        return Prompt(tokens=self.tokenize(rendered.text, add_bos=False), stop=rendered.stop, text=rendered.text)

    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[Chunk]:
        """Generate text piece by piece; the last piece has the finish reason and token counts.

        Checks the prompt and the settings at once (not at the first piece), so errors come before
        any output. Closing the iterator cancels the request and frees its slot.
        """
        return self._submit(prompt, sampling, asynchronous=False)

    def astream(self, prompt: Prompt, sampling: Sampling) -> AsyncIterator[Chunk]:
        """`stream` for asyncio: call it in the event loop; waiting for pieces holds no thread.

        Close it (`close()`) when the reader goes away, to cancel the request.
        """
        return self._submit(prompt, sampling, asynchronous=True)  # type: ignore[return-value]

    def _submit(self, prompt: Prompt, sampling: Sampling, asynchronous: bool) -> Any:
        self._check_fits(prompt)
        return self._scheduler.submit(
            prompt.tokens, sampling, [*prompt.stop, *sampling.stop], asynchronous=asynchronous, messages_dropped=prompt.messages_dropped,
            lora=self.adapters.scales_for(sampling.lora), thinking_open=reasoning.thinking_open(prompt.text),
        )

    async def acomplete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        stream = self.astream(prompt, sampling)
        try:
            return Completion.from_pieces([piece async for piece in stream])
        finally:
            stream.close()  # type: ignore[attr-defined]

    def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        return Completion.from_pieces(list(self.stream(prompt, sampling)))

    def embedding_tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """The text in the embedding model's tokens."""
        return (self._embedding_model or self._model).tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def embedding_detokenize(self, tokens: list[int]) -> str:
        return _text_of(self._embedding_model or self._model, tokens).decode("utf-8", errors="replace")

    def embed(self, text: str) -> list[float]:
        """The text's embedding: pooled, unit length. Made in a context of its own (created on first use)."""
        return self._embedder.embed(self.embedding_tokenize(text))

    def close(self) -> None:
        """Stop generating and free llama.cpp's contexts, then the model, in that order."""
        if self._context is None:
            return
        self._scheduler.stop()
        with quiet(self.options.verbose):  # llama.cpp reports what it frees
            self._embedder.close()
            if self._reranker is not None:
                self._reranker.close()
            llama_cpp.llama_free(self._context)
            self._context = None
            if self._draft_context is not None:
                llama_cpp.llama_free(self._draft_context)
            for companion in (self._draft_model, self._embedding_model, self._reranker_model):
                if companion is not None:
                    companion.close()
            self._model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def fail_everything(self, lost: DeviceLost) -> None:
        """A device the model runs on is gone: every request ends with `lost` (a 503), and so do new ones. The
        scheduler fails its own requests; those who watch (when_lost) fail the rest (server/device_loss.py)."""
        self.lost = lost
        self._scheduler.fail_everything(lost)
        for watcher in self._lost_watchers:
            watcher()

    def when_lost(self, watcher: Callable[[], None]) -> None:
        """Call `watcher` (from ggml's thread that found the device gone) once fail_everything is called."""
        self._lost_watchers.append(watcher)

    def slots(self) -> tuple[list[SlotState], int]:
        """Each slot's state, and how many requests wait for one."""
        return self._scheduler.state()

    def save_slot(self, slot_id: int, path: Path) -> SlotFile:
        """Save a slot's cache to `path` once the slot is idle (engine/slot_files.py)."""
        return self._scheduler.save_slot(slot_id, path)

    def restore_slot(self, slot_id: int, path: Path) -> SlotFile:
        return self._scheduler.restore_slot(slot_id, path)

    def erase_slot(self, slot_id: int) -> int:
        return self._scheduler.erase_slot(slot_id)

    def metrics(self) -> Metrics:
        """What the engine has counted since it started, for /metrics (the recent averages start over)."""
        return self._scheduler.metrics()

    def _check_fits(self, prompt: Prompt) -> None:
        if len(prompt.tokens) >= self.n_ctx:
            after = " even with only the newest turn (--truncate-prompt)" if self.options.truncate_prompt else ""
            raise PromptTooLongError(
                f"the prompt is {len(prompt.tokens)} tokens{after} but the context holds {self.n_ctx}; "
                "shorten it or restart with a larger --ctx-size"
            )


def _text_of(model: InPlaceModel, tokens: list[int]) -> bytes:
    """The bytes of `model`'s tokens (special tokens are not rendered as text)."""
    return b"".join(token_bytes(model.vocab, t) for t in tokens)

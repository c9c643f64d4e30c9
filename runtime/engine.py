"""The engine: the single owner of the llama.cpp model and context.

Every front end (HTTP dialects, `-p`, the browser chat) goes through `Engine`; none of them sees
llama-cpp-python. Generation is serialised by one lock, because one llama.cpp context serves
one sequence at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import llama_cpp._internals as internals
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from runtime.errors import LlamaboxError, ModelFileError
from runtime.model_source import ModelLocation

# Used for chat when a model has no template of its own: plain ChatML, which most base and
# instruct models without a template handle sensibly.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_STOP = "<|im_end|>"


class PromptTooLongError(LlamaboxError):
    """The prompt does not fit into the context window."""


class ChatTemplateError(LlamaboxError):
    """The model's chat template rejected the messages."""


@dataclass(frozen=True)
class EngineOptions:
    ctx_size: int = 4096
    threads: int | None = None
    gpu_layers: int = 0
    system_prompt: str | None = None
    verbose: bool = False


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


@dataclass(frozen=True)
class Chunk:
    """A piece of generated text; the last one of a stream carries the finish reason."""

    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt, with the stop strings its chat template asks for."""

    tokens: list[int]
    stop: list[str] = field(default_factory=list)


class Engine:
    def __init__(self, location: ModelLocation, options: EngineOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        try:
            self._llm = self._load(location, flash_attn=True)
        except ValueError:
            # Flash attention is what llama-server picks when the backend supports it (13% faster
            # decode, 18% faster prompts with SmolLM2 on this CPU); without that support, go without.
            try:
                self._llm = self._load(location, flash_attn=False)
            except ValueError as exc:
                raise ModelFileError(f"llama.cpp could not load the model from {location.path} ({exc})") from None
        metadata = self._llm.metadata
        self.chat_template = metadata.get("tokenizer.chat_template")
        self.model_name = metadata.get("general.name") or location.path.stem
        self.n_ctx = self._llm.n_ctx()
        self._formatter = self._make_formatter()

    def _load(self, location: ModelLocation, flash_attn: bool) -> llama_cpp.Llama:
        with _model_from_file_region(location):
            return llama_cpp.Llama(
                model_path=str(location.path),
                n_ctx=self.options.ctx_size,
                # llama-server's defaults: prompts are evaluated 2048 tokens per call, 512 per ubatch.
                n_batch=2048,
                n_ubatch=512,
                flash_attn=flash_attn,
                n_threads=self.options.threads,
                n_threads_batch=self.options.threads,
                n_gpu_layers=self.options.gpu_layers,
                verbose=self.options.verbose,
            )

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _make_formatter(self) -> Jinja2ChatFormatter:
        model = self._llm._model
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        return Jinja2ChatFormatter(
            template=self.chat_template or CHATML_TEMPLATE,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def text_prompt(self, text: str) -> Prompt:
        return Prompt(tokens=self.tokenize(text) if text else [self._llm.token_bos()])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> Prompt:
        """Apply the chat template (or ChatML) to OpenAI-style messages, adding --system-prompt."""
        if self.options.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.options.system_prompt}, *messages]
        try:
            formatted = self._formatter(messages=messages)
        except Exception as exc:  # Jinja templates raise anything, by design of their authors
            raise ChatTemplateError(f"the model's chat template rejected these messages: {exc}") from None
        stop = [s for s in [*(formatted.stop or []), None if self.chat_template else CHATML_STOP] if s]
        # The template writes the BOS token itself where the model wants one.
        return Prompt(tokens=self.tokenize(formatted.prompt, add_bos=False), stop=stop)

    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[Chunk]:
        """Generate text piece by piece. Closing the iterator stops generation and frees the engine.

        Checks the prompt at once (not at the first piece), so errors come before any output.
        """
        self._check_fits(prompt)
        return self._generate(prompt, sampling)

    def _generate(self, prompt: Prompt, sampling: Sampling) -> Iterator[Chunk]:
        with self._lock:
            pieces = self._llm.create_completion(
                prompt.tokens, stream=True, **self._sampling_kwargs(prompt, sampling)
            )
            try:
                for piece in pieces:
                    choice = piece["choices"][0]
                    yield Chunk(text=choice["text"], finish_reason=choice["finish_reason"])
            finally:
                pieces.close()

    def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        self._check_fits(prompt)
        with self._lock:
            result = self._llm.create_completion(prompt.tokens, stream=False, **self._sampling_kwargs(prompt, sampling))
        choice, usage = result["choices"][0], result["usage"]
        return Completion(
            text=choice["text"],
            finish_reason=choice["finish_reason"] or "stop",
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False)) if text else 0

    def _check_fits(self, prompt: Prompt) -> None:
        if len(prompt.tokens) >= self.n_ctx:
            raise PromptTooLongError(
                f"the prompt is {len(prompt.tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten it or restart with a larger --ctx-size"
            )

    def _sampling_kwargs(self, prompt: Prompt, s: Sampling) -> dict[str, Any]:
        return {
            # llama-cpp-python reads a non-positive limit as "until the context is full".
            "max_tokens": s.max_tokens if s.max_tokens and s.max_tokens > 0 else -1,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "seed": s.seed,
            "stop": [*prompt.stop, *s.stop],
            "logit_bias": s.logit_bias or None,
        }


# --- loading the weights in place ----------------------------------------------------------------
# llama_cpp.Llama only loads from a path, and a GGUF inside a bundle does not start at offset 0.
# llama.cpp itself can load from an open FILE* positioned at the GGUF (llama_model_load_from_file_ptr)
# and then memory-maps the weights straight from the bundle. Llama has no hook for that, so while
# it is constructed, its model class is swapped for one that loads this way.

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.fopen.argtypes, _libc.fopen.restype = [ctypes.c_char_p, ctypes.c_char_p], ctypes.c_void_p
_libc.fseeko.argtypes, _libc.fseeko.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int
_libc.fclose.argtypes, _libc.fclose.restype = [ctypes.c_void_p], ctypes.c_int
_SEEK_SET = 0
_construction_lock = threading.Lock()


class _ModelFromFileRegion(internals.LlamaModel):
    """A LlamaModel whose weights are read, and mapped, from `location` in a larger file."""

    def __init__(self, *, path_model: str, params: Any, verbose: bool = True, location: ModelLocation) -> None:
        self.path_model, self.params, self.verbose = path_model, params, verbose
        self._exit_stack = contextlib.ExitStack()
        self.sampler = None
        self.custom_samplers = []
        self.model = None

        fp = _libc.fopen(str(location.path).encode(), b"rb")
        if not fp:
            raise ValueError(f"cannot open {location.path}")
        # The FILE stays open as long as the model: llama.cpp keeps it for its mapping.
        self._exit_stack.callback(_libc.fclose, fp)
        model = None
        if _libc.fseeko(fp, location.offset, _SEEK_SET) == 0:
            with suppress_stdout_stderr(disable=verbose):
                model = llama_cpp.llama_model_load_from_file_ptr(fp, params)
        if model is None:
            self._exit_stack.close()
            raise ValueError("not a model llama.cpp can read")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)

        def free_model() -> None:
            if self.model is not None:
                llama_cpp.llama_model_free(self.model)
                self.model = None

        self._exit_stack.callback(free_model)


@contextlib.contextmanager
def _model_from_file_region(location: ModelLocation) -> Iterator[None]:
    with _construction_lock:
        original = internals.LlamaModel
        internals.LlamaModel = functools.partial(_ModelFromFileRegion, location=location)  # type: ignore[misc]
        try:
            yield
        finally:
            internals.LlamaModel = original  # type: ignore[misc]

"""Fill-in-the-middle prompts, as llama-server's /infill builds them for code-completion plugins (llama.vscode,
llama.vim): the code before and after the cursor between the model's own FIM tokens, with other files of the
project before them.

llama.cpp's C API gives the tokens (llama_vocab_fim_*) but not the assembly, which lives in llama-server's C++
(format_prompt_infill), so it is written here, in the same order and with the same budgets:

    [REP "myproject\\n"] ([SEP filename"\\n"] text)... [SEP "filename\\n"]   the project's other files, if any
    [BOS] PRE prefix prompt SUF suffix MID                                  the file being edited

The prefix keeps its last 3/4 of a batch's tokens, the suffix its first 1/4 (less the prompt's), and the other
files their last tokens that leave a batch and twice the answer free in the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

PROJECT = "myproject"  # the repository name llama-server writes after the REP token
SNIPPET = "\n\n--- snippet ---\n\n"  # between files, for a model without a SEP token


@dataclass(frozen=True)
class FimTokens:
    """The model's fill-in-the-middle tokens; None where it has none (llama.cpp's LLAMA_TOKEN_NULL)."""

    pre: int | None
    suf: int | None
    mid: int | None
    rep: int | None
    sep: int | None
    bos: int | None  # added before PRE where the model's tokenizer adds one

    @classmethod
    def of(cls, vocab: object) -> FimTokens:
        def token(getter: Callable[[object], int]) -> int | None:
            found = getter(vocab)
            return None if found == llama_cpp.LLAMA_TOKEN_NULL else found

        bos = token(llama_cpp.llama_vocab_bos) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
        return cls(
            token(llama_cpp.llama_vocab_fim_pre), token(llama_cpp.llama_vocab_fim_suf), token(llama_cpp.llama_vocab_fim_mid),
            token(llama_cpp.llama_vocab_fim_rep), token(llama_cpp.llama_vocab_fim_sep), bos,
        )

    def missing(self) -> str:
        """What the model lacks for infill, in llama-server's words ("" when it has everything)."""
        return "".join(f"{what} token is missing. " for what, t in (("prefix", self.pre), ("suffix", self.suf), ("middle", self.mid)) if t is None)


@dataclass(frozen=True)
class InfillRequest:
    prefix: list[int]  # the code before the cursor, as tokens
    suffix: list[int]  # the code after it
    prompt: list[int] = field(default_factory=list)  # text to continue the prefix with
    extra: list[tuple[str, str]] = field(default_factory=list)  # other files: (name, text)


def infill_tokens(
    fim: FimTokens, request: InfillRequest, tokenize: Callable[[str], list[int]], n_batch: int, n_ctx: int, n_predict: int
) -> list[int]:
    """The prompt's tokens; `tokenize` reads plain text (no special tokens, no BOS)."""
    assert fim.pre is not None and fim.suf is not None and fim.mid is not None, fim.missing()
    extra: list[int] = []
    if request.extra:
        if fim.rep is not None:
            extra += [fim.rep, *tokenize(PROJECT + "\n")]
        for name, text in request.extra:
            extra += [fim.sep, *tokenize(name + "\n")] if fim.sep is not None else tokenize(SNIPPET)
            extra += tokenize(text)
        if fim.sep is not None:
            extra += [fim.sep, *tokenize("filename\n")]
    n_prefix = min(len(request.prefix), 3 * (n_batch // 4))
    n_suffix = min(len(request.suffix), max(0, n_batch // 4 - (2 + len(request.prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
    prefix = request.prefix[len(request.prefix) - n_prefix :]
    return [
        *extra[len(extra) - n_extra :],
        *([fim.bos] if fim.bos is not None else []),
        fim.pre, *prefix, *request.prompt,
        fim.suf, *request.suffix[:n_suffix],
        fim.mid,
    ]

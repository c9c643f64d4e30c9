"""The access log: one line per request on stderr (--verbose), with the tokens its generation counted.

The guard opens a request's counter; the generation that serves the request adds to it, wherever
the dialect runs it (a context variable carries the counter through the request's task).
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import Scope


@dataclass
class RequestTokens:
    prompt: int = 0
    generated: int = 0
    counted: bool = False


REQUEST_TOKENS: ContextVar[RequestTokens | None] = ContextVar("llamabox_request_tokens", default=None)


def count_tokens(prompt: int, generated: int) -> None:
    """Add a generation's token counts to the access log line of the request being served (if any)."""
    tokens = REQUEST_TOKENS.get()
    if tokens is not None:
        tokens.prompt, tokens.generated, tokens.counted = tokens.prompt + prompt, tokens.generated + generated, True


def log_line(scope: Scope, status: int, tokens: RequestTokens, seconds: float) -> None:
    counts = f", {tokens.prompt} prompt + {tokens.generated} generated tokens" if tokens.counted else ""
    method = scope.get("method", "WS")
    print(f"llamabox: {method} {scope['path']} {status or '-'}{counts}, {seconds:.2f} s", file=sys.stderr, flush=True)

"""GET /metrics in Prometheus's text format, with llama-server's metric names (`llamacpp:...`), so that a scrape
configured for llama-server reads a bundle unchanged. Off unless the server runs with --metrics, as there.

Written out here rather than with prometheus_client: the names, help texts and the averages that start over
at each scrape are llama-server's, which that library's collectors would not give without as much code.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from runtime.engine import Engine, Metrics
from runtime.server.errors import ApiError
from runtime.server.settings import ServerSettings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def metrics(request: Request) -> Response:
    settings: ServerSettings = request.app.state.settings
    if not settings.metrics:
        raise ApiError(501, "metrics are off: start the server with --metrics to serve them here")
    engine: Engine = request.app.state.engine
    slots, waiting = engine.slots()
    return PlainTextResponse(render(engine.metrics(), sum(s.is_processing for s in slots), waiting), media_type=CONTENT_TYPE)


def render(counted: Metrics, processing: int, deferred: int) -> str:
    counters = [
        ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens", counted.prompt_tokens),
        ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", counted.prompt_tokens_cached),
        ("prompt_seconds_total", "Total time spent processing prompts", counted.prompt_seconds),
        ("tokens_predicted_total", "Number of generation tokens processed", counted.tokens_predicted),
        ("tokens_predicted_seconds_total", "Total time spent generating tokens", counted.predicted_seconds),
        ("n_decode_total", "Total number of llama_decode() calls", counted.n_decode),
        ("n_tokens_max", "Largest observed sequence length (prompt + generation)", counted.n_tokens_max),
        ("spec_decode_num_drafts_total", "Number of speculative decoding drafts checked", counted.drafts),
        ("spec_decode_num_draft_tokens_total", "Number of tokens drafted", counted.draft_tokens),
        ("spec_decode_num_accepted_tokens_total", "Number of drafted tokens accepted", counted.draft_tokens_accepted),
    ]
    gauges = [
        ("prompt_tokens_seconds", "Average prompt throughput in tokens/s", _rate(counted.recent_prompt_tokens, counted.recent_prompt_seconds)),
        ("predicted_tokens_seconds", "Average generation throughput in tokens/s", _rate(counted.recent_predicted_tokens, counted.recent_predicted_seconds)),
        ("requests_processing", "Number of requests processing", processing),
        ("requests_deferred", "Number of requests deferred", deferred),
        ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call", counted.n_busy_slots / max(counted.n_decode, 1)),
    ]
    lines = []
    for kind, items in (("counter", counters), ("gauge", gauges)):
        for name, description, value in items:
            lines += [f"# HELP llamacpp:{name} {description}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value:g}"]
    return "\n".join(lines) + "\n"


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0

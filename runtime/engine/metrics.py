"""What the engine counts for llama-server's /metrics: tokens read and generated, the time each took, decode
calls and how full they were.

The scheduler's thread adds to the counters under its lock; `Metrics.read` hands out a copy and, as
llama-server does, starts the throughput averages (its "buckets") over, so that each scrape's tokens per second
cover the time since the one before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class Metrics:
    prompt_tokens: int = 0  # read by llama_decode, not counting those reused from the cache
    prompt_tokens_cached: int = 0
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    predicted_seconds: float = 0.0
    n_decode: int = 0  # llama_decode calls
    n_busy_slots: int = 0  # summed over those calls: divided by n_decode, how many slots each one served
    n_tokens_max: int = 0  # the longest sequence seen, prompt and generated tokens
    drafts: int = 0  # speculative decoding: the drafts checked, their tokens, and those the model chose too
    draft_tokens: int = 0
    draft_tokens_accepted: int = 0
    # Since the last read: the averages of llama-server's gauges.
    recent_prompt_tokens: int = 0
    recent_prompt_seconds: float = 0.0
    recent_predicted_tokens: int = 0
    recent_predicted_seconds: float = 0.0

    def request_done(self, read: int, reused: int, prompt_seconds: float, generated: int, generating_seconds: float) -> None:
        self.prompt_tokens += read
        self.prompt_tokens_cached += reused
        self.prompt_seconds += prompt_seconds
        self.tokens_predicted += generated
        self.predicted_seconds += generating_seconds
        self.recent_prompt_tokens += read
        self.recent_prompt_seconds += prompt_seconds
        self.recent_predicted_tokens += generated
        self.recent_predicted_seconds += generating_seconds

    def decoded(self, busy_slots: int, longest: int) -> None:
        self.n_decode += 1
        self.n_busy_slots += busy_slots
        self.n_tokens_max = max(self.n_tokens_max, longest)

    def drafted(self, tokens: int, accepted: int) -> None:
        self.drafts += 1
        self.draft_tokens += tokens
        self.draft_tokens_accepted += accepted

    def read(self) -> Metrics:
        """A copy of the counters; the recent ones start over."""
        copy = replace(self)
        self.recent_prompt_tokens = self.recent_predicted_tokens = 0
        self.recent_prompt_seconds = self.recent_predicted_seconds = 0.0
        return copy

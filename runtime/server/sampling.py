"""A request's sampling settings: the server's defaults, overridden by the fields the request sets."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from runtime.engine import Sampling
from runtime.server.body import Body
from runtime.server.errors import ApiError


def override(defaults: Sampling, **fields: Any) -> Sampling:
    """`defaults` with every field that is not None replaced (a field a request leaves out or sends as null)."""
    return replace(defaults, **{name: value for name, value in fields.items() if value is not None})


def logit_bias(body: Body, name: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's {"token id": bias} (-100 to 100); ids outside the vocabulary are refused by the engine."""
    value = body.obj(name)
    if value is None:
        return None
    bias = {}
    for token, amount in value.data.items():
        if not str(token).lstrip("-").isdigit():
            raise ApiError(400, f"'{name}' keys must be token ids, not {token!r}", param=name)
        number = value.number(token, minimum=-100, maximum=100)
        if number is not None:
            bias[int(token)] = number
    return bias


def lora(body: Body, name: str = "lora") -> dict[int, float] | None:
    """llama-server's per-request LoRA scales: [{"id": 0, "scale": 0.5}, ...] (adapters left out get 0)."""
    items = body.array(name)
    return None if items is None else lora_scales(items, name)


def lora_scales(items: list[Any], name: str) -> dict[int, float]:
    """[{"id": N, "scale": X}, ...] as {N: X}, each entry checked; also POST /lora-adapters' body."""
    scales = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"'{name}' must be a list of objects such as {{\"id\": 0, \"scale\": 1.0}}", param=name)
        entry = Body(item, prefix=f"{name}[{i}].")
        adapter_id = entry.integer("id", required=True, minimum=0)
        scale = entry.number("scale", minimum=-LARGEST_SCALE, maximum=LARGEST_SCALE)
        assert adapter_id is not None
        scales[adapter_id] = 0.0 if scale is None else scale
    return scales


# Scales beyond this are no adapter anyone trained: refused rather than turned into NaN logits.
LARGEST_SCALE = 100.0


def seed(body: Body, name: str = "seed") -> int | None:
    value = body.integer(name)
    return None if value is None or value == -1 else value & 0xFFFFFFFF  # -1: random, as llama.cpp

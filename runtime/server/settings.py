"""What the server needs to know besides the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.engine import Sampling


@dataclass(frozen=True)
class Access:
    """Who may talk to the server (guard.py enforces it)."""

    api_key: str | None = None  # every API route wants it as a Bearer token or x-api-key
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides IP addresses and localhost
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API; none by default
    access_log: bool = False  # one line per request on stderr


@dataclass(frozen=True)
class ModelFacts:
    """What the chat page and the APIs show about the model."""

    file_name: str
    size: int  # bytes of the GGUF
    architecture: str = ""
    parameters: str = ""  # e.g. "135M"
    license: str = ""


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    started_at: int
    fingerprint: str
    defaults: Sampling  # from the command line and the bundle's baked arguments; requests override fields
    ui_dir: Path
    hardware: dict[str, Any]
    model: ModelFacts
    system_prompt: str | None = None
    access: Access = field(default_factory=Access)
    metrics: bool = False  # GET /metrics answers (--metrics)

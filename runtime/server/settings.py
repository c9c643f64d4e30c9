"""What the server needs to know besides the engine."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.engine import Sampling
from runtime.errors import LlamaboxError


@dataclass(frozen=True)
class Tls:
    """HTTPS: the key and certificate files (--ssl-key-file, --ssl-cert-file), checked to load together."""

    key_file: Path
    cert_file: Path

    @classmethod
    def load(cls, key_file: Path, cert_file: Path) -> Tls:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise LlamaboxError(
                f"--ssl-cert-file {cert_file} and --ssl-key-file {key_file} do not load as a PEM certificate and its key "
                f"({getattr(exc, 'reason', None) or exc.strerror or exc}); give the files your certificate authority issued"
            ) from None
        return cls(key_file, cert_file)


@dataclass(frozen=True)
class Access:
    """Who may talk to the server, and how (guard.py enforces it)."""

    api_keys: tuple[str, ...] = ()  # every API route wants one of them as a Bearer token or x-api-key; none: no key
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides IP addresses and localhost
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API; none by default
    access_log: bool = False  # one line per request on stderr
    tls: Tls | None = None  # HTTPS instead of HTTP


@dataclass(frozen=True)
class Endpoints:
    """llama-server's optional routes, as its flags set them."""

    slots: bool = True  # GET /slots (--no-slots turns it off)
    props: bool = False  # POST /props (--props)
    webui: bool = True  # the chat page at / (--no-webui turns it off)
    slot_save_path: Path | None = None  # POST /slots/{id} saves and restores slots' caches here (--slot-save-path)


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
    model_id: str  # the first --alias, else the model's name
    started_at: int
    fingerprint: str
    defaults: Sampling  # from the command line and the bundle's baked arguments; requests override fields
    ui_dir: Path
    hardware: dict[str, Any]
    model: ModelFacts
    system_prompt: str | None = None
    access: Access = field(default_factory=Access)
    metrics: bool = False  # GET /metrics answers (--metrics)
    endpoints: Endpoints = field(default_factory=Endpoints)
    aliases: tuple[str, ...] = ()  # --alias: every name given
    reasoning_format: str = "auto"  # --reasoning-format: where a chat reply's thoughts go (engine/reasoning.py)
    devices_can_drop: bool = False  # --rpc: a worker may drop out; requests then get a 503 (server/device_loss.py)

"""What the server needs to know besides the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    started_at: int
    fingerprint: str
    temperature: float
    n_predict: int | None
    ui_dir: Path
    hardware: dict[str, Any]

"""Reading a request's JSON body, field by field, the same way for every dialect.

A field sent as JSON `null` counts as absent (OpenAI's clients send nulls for unset options).
Every wrong type or range is an `ApiError` (400) naming the field, in the dialect's own shape.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from runtime.server.errors import ApiError

JSON_TYPES = ("application/json",)


async def read_json(request: Request) -> Body:
    """The body as a JSON object; refuses bodies not sent as JSON."""
    data = await read_json_value(request)
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return Body(data)


async def read_json_value(request: Request) -> Any:
    """The body as any JSON value (POST /lora-adapters takes a list); refuses bodies not sent as JSON.

    A page on another site can POST `text/plain` or a form to 127.0.0.1 without a CORS preflight;
    demanding a JSON content type closes that door (see guard.py for the Host check).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise ApiError(415, "send the body as JSON, with the header Content-Type: application/json")
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    try:  # JSON may escape half of a UTF-16 pair ("\ud800"), which no tokenizer can take
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); send valid Unicode") from None
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class Body:
    """Typed access to a JSON object's fields; `None` means the field is absent or null."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data, self._prefix = data, prefix

    def __contains__(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.data.get(name)

    def fail(self, name: str, what: str) -> ApiError:
        return ApiError(400, f"'{self._prefix}{name}' {what}", param=f"{self._prefix}{name}")

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self._present(name, required)
        if value is not None and not isinstance(value, str):
            raise self.fail(name, "must be a string")
        return value

    def choice(self, name: str, options: tuple[str, ...]) -> str | None:
        """A string that must be one of `options`."""
        value = self.string(name)
        if value is not None and value not in options:
            raise self.fail(name, f"must be one of {', '.join(options)}")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, bool):
            raise self.fail(name, "must be true or false")
        return value

    def integer(self, name: str, *, minimum: int | None = None, maximum: int | None = None, required: bool = False) -> int | None:
        value = self._present(name, required)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(name, "must be a whole number")
        self._check_range(name, value, minimum, maximum)
        return value

    def number(self, name: str, *, minimum: float | None = None, maximum: float | None = None) -> float | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise self.fail(name, "must be a number")
        self._check_range(name, value, minimum, maximum)  # a whole number of any size compares with the bounds exactly
        try:
            return float(value)
        except OverflowError:  # a whole number of over 308 digits, with no bound to refuse it
            raise self.fail(name, "must be a number of at most 308 digits") from None

    def strings(self, name: str, *, limit: int | None = None) -> list[str] | None:
        """A string or a list of strings (as `stop` is in every dialect)."""
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "must be a string or a list of strings")
        if limit is not None and len(value) > limit:
            raise self.fail(name, f"may hold at most {limit} strings")
        return value

    def obj(self, name: str, *, required: bool = False) -> Body | None:
        value = self._present(name, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, "must be an object")
        return Body(value, prefix=f"{self._prefix}{name}.")

    def array(self, name: str, *, required: bool = False) -> list[Any] | None:
        value = self._present(name, required)
        if value is not None and not isinstance(value, list):
            raise self.fail(name, "must be a list")
        return value

    def _present(self, name: str, required: bool) -> Any:
        value = self.data.get(name)
        if value is None and required:
            raise self.fail(name, "is required")
        return value

    def _check_range(self, name: str, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.fail(name, f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise self.fail(name, f"must be at most {maximum}")

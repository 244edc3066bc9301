"""Reading a request body: size limit, UTF-8, JSON, and fields of the expected JSON type.

A field of the wrong type is a 400 naming the field, never coerced (`"max_tokens": "12"` is refused, as OpenAI
does) and never a 500 deeper in. JSON's NaN and Infinity are refused too: no decoding setting means anything there.
"""

from __future__ import annotations

import json

from starlette.requests import ClientDisconnect, Request

from ar2dlm.serving.errors import ApiError, invalid

_MISSING = object()

# JSON type names as the error messages say them -> the Python types json.loads gives
_KINDS = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
          "array": (list,)}
_ARTICLE = {"integer": "an", "object": "an", "array": "an"}


async def read_json_body(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object; 413 past `max_bytes` (before reading when Content-Length says so), 400 when it
    is not UTF-8, not JSON, or not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:  # a chunked body has no Content-Length: count as it arrives
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise invalid("the client disconnected before the body was complete") from None
    return parse_json_object(b"".join(chunks))


def parse_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise invalid("the request body is empty: send a JSON object", code="invalid_json")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_kind(value)}", code="invalid_json")
    return value


def field(body: dict, name: str, kinds: str | tuple[str, ...], default=_MISSING, parent: str | None = None):
    """body[name] checked to be one of the JSON `kinds` (or null, which means `default`); 400 when it is required
    and missing, or of another type. `parent` names the enclosing field in messages (`messages[0].content`)."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    where = f"{parent}.{name}" if parent else name
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise invalid(f"'{where}' is required", param=where, code="missing_required_parameter")
        return default
    if not any(_is_kind(value, k) for k in kinds):
        wanted = " or ".join(f"{_ARTICLE.get(k, 'a')} {k}" for k in kinds)
        raise invalid(f"'{where}' must be {wanted}, got {_json_kind(value)} {_short(value)}", param=where,
                      code="invalid_type")
    return value


def _is_kind(value, kind: str) -> bool:
    if isinstance(value, bool):  # JSON true is not the number 1
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return False
    return isinstance(value, _KINDS[kind])


def _json_kind(value) -> str:
    for kind in ("boolean", "string", "integer", "number", "object", "array"):
        if _is_kind(value, kind):
            return kind
    return "null"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {max_bytes} bytes "
                         "(--max-body-bytes)", code="request_too_large")

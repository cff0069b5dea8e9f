"""From HTTP bytes to a validated protocol model, before anything needs the model.

`read_body` reads the body under a size limit; `parse_json` parses it
(refusing invalid Unicode, such as a lone surrogate, anywhere in it),
`check_unsupported` refuses fields the server does not implement, and
`parse_as` validates it against a protocol model. Every problem is an
`APIError` (400, or 413 for a body over the limit) naming the field; none
carries an exception's text.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from router.errors import APIError, bad_request
from router.protocol import (
    FIELD_EXPECTS,
    UNSUPPORTED,
    UNSUPPORTED_IN_MESSAGE,
    CalledFunction,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Endpoint,
    FunctionName,
    FunctionSpec,
    JsonSchemaFormat,
    MessageToolCall,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    TextPart,
    Tool,
    is_unset,
)

# Half of a UTF-16 surrogate pair, alone: JSON can spell it ("\ud800"),
# Python holds it in a str, but it is not Unicode and cannot be encoded.
_SURROGATE = re.compile("[\ud800-\udfff]")

Body = TypeVar("Body", bound=BaseModel)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read at most `limit` bytes of body and parse them as a JSON object."""
    return parse_json(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes of body (413 beyond it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request(f"bad Content-Length header: {declared!r}") from None
        if size > limit:
            raise _too_large(size, limit)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:  # stop reading: a chunked body may be endless
            raise _too_large(None, limit)
    return bytes(buf)


def _too_large(size: int | None, limit: int) -> APIError:
    what = f"{size} bytes" if size is not None else "too large"
    return APIError(413, f"request body is {what}; the limit is {limit} bytes")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (at byte {e.start})") from None
    if not text.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise bad_request(
            f"malformed JSON in request body: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except RecursionError:
        raise bad_request("malformed JSON in request body: nested too deeply") from None
    except ValueError as e:  # only _reject_constant's, which names the constant
        raise bad_request(f"malformed JSON in request body: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"request body must be a JSON object, got {type(obj).__name__}")
    _check_unicode(obj)
    return obj


def _check_unicode(obj: dict[str, Any]) -> None:
    """Refuse a lone surrogate in any string or key, naming where it is.

    Such a string would fail later, wherever it is first encoded (the
    tokenizer, a protobuf field, the error message that quotes it)."""
    where = _find_surrogate(obj)
    if where is None:
        return
    path, in_key = where
    if in_key:
        at = f"a key in '{path}'" if path else "a key of the request body"
        raise bad_request(f"{at} holds an unpaired UTF-16 surrogate; it is not valid Unicode")
    raise bad_request(
        f"'{path}' holds an unpaired UTF-16 surrogate (such as \\ud800 alone); "
        "it is not valid Unicode",
        param=path,
    )


def _bad_str(s: str) -> bool:
    return not s.isascii() and _SURROGATE.search(s) is not None


def _find_surrogate(obj: Any) -> tuple[str, bool] | None:
    """(path, whether it is a key) of the first string holding a surrogate, or None.

    Iterative: json.loads has already bounded the depth, but the walk should
    not spend the stack again."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _bad_str(value):
                return path, False
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                if _bad_str(key):
                    return path, True
                items.append((f"{path}.{key}" if path else key, item))
            stack.extend(reversed(items))  # document order
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def check_unsupported(obj: dict[str, Any], endpoint: Endpoint) -> None:
    """Refuse, by name, a field the server does not implement that holds
    anything but its unset value (protocol.UNSUPPORTED)."""
    for name, unset in UNSUPPORTED[endpoint].items():
        if name in obj and not is_unset(obj[name], unset):
            raise _unsupported(name)
    messages = obj.get("messages") if endpoint == "chat_completions" else None
    if not isinstance(messages, list):
        return  # a missing or mistyped list is parse_as's to report
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        for name, unset in UNSUPPORTED_IN_MESSAGE.items():
            if name in message and not is_unset(message[name], unset):
                raise _unsupported(f"messages[{i}].{name}")


def _unsupported(name: str) -> APIError:
    return bad_request(
        f"'{name}' is not supported by this server; leave it out or send null", param=name
    )


_FIELD_NAMES = frozenset(
    name
    for cls in (
        CompletionRequest,
        ChatCompletionRequest,
        ChatMessage,
        TextPart,
        StreamOptions,
        ResponseFormat,
        JsonSchemaFormat,
        Tool,
        FunctionSpec,
        NamedToolChoice,
        FunctionName,
        MessageToolCall,
        CalledFunction,
    )
    for name in cls.model_fields
)


def parse_as(cls: type[Body], obj: dict[str, Any]) -> Body:
    """Validate a JSON object as `cls`; the first error becomes a 400 naming its field."""
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise _describe(e) from None


def _describe(err: ValidationError) -> APIError:
    first = err.errors()[0]
    path, last_field, in_union = "", "", False
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELD_NAMES:
            path += f".{part}" if path else part
            last_field = part
        else:
            # A union member's tag ("str", "list[int]"): what follows is why
            # that one member failed, which says less than the field's hint.
            in_union = True
            break
    if first["type"] == "missing":
        return bad_request(f"'{path}' is required", param=path)
    if in_union and last_field in FIELD_EXPECTS:
        return bad_request(f"'{path}' must be {FIELD_EXPECTS[last_field]}", param=path)
    if not path:
        return bad_request(f"invalid request body: {first['msg']}")
    return bad_request(f"'{path}': {first['msg']}", param=path)

"""From HTTP bytes to a validated, tokenized request.

`read_body` reads the body under a size limit; `prepare` does the rest:
`parse_json` parses it (refusing invalid Unicode, such as a lone surrogate,
anywhere in it), `check_unsupported` refuses fields the server does not
implement, `parse_as` validates it against a protocol model, and
`prepare_completion` and `prepare_chat` tokenize and check everything that
needs the model (context length, vocabulary) and build the engine's
SamplingParams. Every problem is an `APIError` (400, or 413 for a body over
the limit) naming the field; none carries an exception's text.

`prepare` is synchronous and touches nothing but its arguments and the
tokenizer (read-only: no truncation or padding is ever set on it), so the
router runs it in a thread for large bodies (OFF_LOOP_BYTES): tokenizing a
megabyte of text must not stall every other stream on the event loop.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from engine.sampling_params import SamplingParams
from router.errors import APIError, bad_request
from router.protocol import (
    FIELD_EXPECTS,
    UNSUPPORTED,
    UNSUPPORTED_IN_MESSAGE,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Endpoint,
    StreamOptions,
    TextPart,
    is_unset,
)

log = logging.getLogger("splitserve.router")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
_INT32_MAX = 2**31 - 1
_UINT64_LIMIT = 2**64
# Bodies at least this large are parsed and tokenized off the event loop
# (below it, the work takes well under a millisecond: a thread hop would cost more).
OFF_LOOP_BYTES = 16 << 10
# Half of a UTF-16 surrogate pair, alone: JSON can spell it ("\ud800"),
# Python holds it in a str, but it is not Unicode and cannot be encoded.
_SURROGATE = re.compile("[\ud800-\udfff]")

Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class ServedModel:
    """What validation needs to know about the one model this router serves."""

    name: str  # the `model` clients must send
    path: str  # the model directory
    vocab_size: int
    max_model_len: int  # prompt + output tokens
    tokenizer: Any  # a transformers tokenizer


@dataclass(frozen=True)
class Prepared:
    """A request ready to send to a decode worker."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool  # streaming: send a usage chunk before [DONE]
    logprobs: bool  # report each sampled token's logprob


# -- the body ------------------------------------------------------------------


def prepare(raw: bytes, endpoint: Endpoint, served: ServedModel) -> Prepared:
    """A request body, from its bytes to a request ready to send (or an APIError)."""
    obj = parse_json(raw)
    check_unsupported(obj, endpoint)
    if endpoint == "completions":
        return prepare_completion(parse_as(CompletionRequest, obj), served)
    return prepare_chat(parse_as(ChatCompletionRequest, obj), served)


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
    for cls in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
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


# -- the model's view ------------------------------------------------------------


def prepare_completion(req: CompletionRequest, served: ServedModel) -> Prepared:
    """Validate and tokenize a /v1/completions request."""
    _check_common(req, served)
    if req.echo:
        raise bad_request("echo is not supported", param="echo")
    if req.best_of not in (None, 1):
        raise bad_request("best_of must be 1 (or absent)", param="best_of")
    if req.logprobs is not None and req.logprobs < 0:
        raise bad_request(f"logprobs must be >= 0, got {req.logprobs}", param="logprobs")
    if req.logprobs is not None and req.logprobs > 1:
        raise bad_request(
            "logprobs > 1 (the top alternatives) is not supported; 0 or 1 return the "
            "sampled token's log-probability",
            param="logprobs",
        )
    ids = _completion_prompt_ids(req.prompt, served)
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    return _prepare(req, served, ids, max_tokens, logprobs=req.logprobs is not None)


def prepare_chat(req: ChatCompletionRequest, served: ServedModel) -> Prepared:
    """Validate a /v1/chat/completions request and apply the chat template."""
    _check_common(req, served)
    if req.top_logprobs:
        raise bad_request("top_logprobs > 0 is not supported yet", param="top_logprobs")
    if not req.messages:
        raise bad_request("messages must hold at least one message", param="messages")
    ids = _chat_prompt_ids(req.messages, served)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else None
    if max_tokens is None:
        max_tokens = req.max_tokens
    if max_tokens is None:  # the rest of the context
        max_tokens = max(1, served.max_model_len - len(ids))
    return _prepare(req, served, ids, max_tokens, logprobs=bool(req.logprobs))


def _check_common(req: CompletionRequest | ChatCompletionRequest, served: ServedModel) -> None:
    if req.model is not None and req.model != served.name:
        raise APIError(
            400,
            f"model '{req.model}' is not served here; this server serves '{served.name}'",
            param="model",
            code="model_not_found",
        )
    if req.n not in (None, 1):
        raise bad_request("n must be 1", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise bad_request(f"{name} is not supported (only 0)", param=name)


def _completion_prompt_ids(prompt: Any, served: ServedModel) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise bad_request(
                "batched prompts are not supported; send one request per prompt", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        # Exactly what the offline engine does, so outputs match token for token.
        ids = [int(t) for t in served.tokenizer.encode(prompt)]
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < served.vocab_size]
        if bad:
            raise bad_request(
                f"prompt token ids must be in [0, {served.vocab_size}); got {bad[:5]}",
                param="prompt",
            )
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    return ids


def _chat_prompt_ids(messages: list[ChatMessage], served: ServedModel) -> list[int]:
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request(
            f"model '{served.name}' has no chat template; use /v1/completions",
            code="no_chat_template",
        )
    flat: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"only text content parts are supported; got type '{part.type}'",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        flat.append({"role": m.role, "content": content or ""})
    try:
        out = tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # the template is the model's code: report, don't crash
        raise _template_failed(e) from None
    # transformers 5 returns a BatchEncoding; older versions a list of ids.
    ids = out["input_ids"] if hasattr(out, "keys") else out
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    ids = [int(t) for t in ids]
    if not ids:
        raise bad_request("the chat template produced an empty prompt", param="messages")
    return ids


def _template_failed(e: Exception) -> APIError:
    """A template's own refusal (`raise_exception(...)`, a TemplateError) is
    written for the user: pass it on. Anything else is internal: log it."""
    from jinja2.exceptions import TemplateError

    if type(e) is TemplateError and str(e):
        return bad_request(f"the chat template refused these messages: {e}", param="messages")
    log.warning("the chat template failed: %s: %s", type(e).__name__, e)
    return bad_request("the model's chat template failed on these messages", param="messages")


def _prepare(
    req: CompletionRequest | ChatCompletionRequest,
    served: ServedModel,
    ids: list[int],
    max_tokens: int,
    *,
    logprobs: bool,
) -> Prepared:
    limit = served.max_model_len
    if len(ids) >= limit:
        raise bad_request(
            f"prompt has {len(ids)} tokens; the context length is {limit}", param="prompt"
        )
    if max_tokens < 1:
        raise bad_request(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if len(ids) + max_tokens > limit:
        raise bad_request(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = "
            f"{len(ids) + max_tokens} exceeds the context length {limit}",
            param="max_tokens",
        )
    stream = bool(req.stream)
    opts = req.stream_options
    return Prepared(
        prompt_ids=ids,
        params=_sampling(req, served, max_tokens, logprobs),
        stream=stream,
        # A usage chunk by default; include_usage: false turns it off.
        include_usage=stream and (opts is None or opts.include_usage is not False),
        logprobs=logprobs,
    )


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    served: ServedModel,
    max_tokens: int,
    logprobs: bool,
) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
    stop_ids = list(req.stop_token_ids or [])
    if any(not 0 <= t < served.vocab_size for t in stop_ids):
        raise bad_request(
            f"stop_token_ids must be in [0, {served.vocab_size})", param="stop_token_ids"
        )
    if req.seed is not None and not 0 <= req.seed < _UINT64_LIMIT:
        raise bad_request("seed must be in [0, 2**64)", param="seed")
    top_k = req.top_k if req.top_k is not None else 0
    if top_k > _INT32_MAX:
        raise bad_request(f"top_k must be <= {_INT32_MAX}", param="top_k")
    try:
        return SamplingParams(
            temperature=float(req.temperature) if req.temperature is not None else 1.0,
            top_p=float(req.top_p) if req.top_p is not None else 1.0,
            top_k=top_k,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            stop=tuple(stop),
            stop_token_ids=tuple(stop_ids),
            seed=req.seed,
            logprobs=0 if logprobs else None,
        )
    except ValueError as e:
        # SamplingParams' messages start with the field's name.
        raise bad_request(str(e), param=str(e).split(" ", 1)[0]) from None

"""From HTTP bytes to a validated, tokenized request.

`prepare` parses and validates the body (router/body.py), turns the prompt
into token ids (router/prompt_ids.py), checks everything that needs the
model (context length, vocabulary) and builds the engine's SamplingParams.
Every problem is an `APIError` (400) naming the field; none carries an
exception's text.

`prepare` is synchronous and touches nothing but its arguments and the
tokenizer (read-only: no truncation or padding is ever set on it), so the
router runs it in a thread for large bodies (OFF_LOOP_BYTES): tokenizing a
megabyte of text must not stall every other stream on the event loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import GuidedSpec, SamplingParams
from router.body import check_unsupported, parse_as, parse_json
from router.errors import APIError, bad_request
from router.prompt_ids import chat_prompt_ids, completion_prompt_ids
from router.protocol import ChatCompletionRequest, CompletionRequest, Endpoint, Prompt
from router.served_model import ServedModel
from router.tools import DEFAULT_PARSER as DEFAULT_TOOL_PARSER
from router.tools import ToolUse, guided_spec

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n and best_of
MAX_LOGPROBS = 20  # alternatives per token (completions' logprobs, chat's top_logprobs)
_INT32_MAX = 2**31 - 1
_UINT64_LIMIT = 2**64
# Bodies at least this large are parsed and tokenized off the event loop
# (below it, the work takes well under a millisecond: a thread hop would cost more).
OFF_LOOP_BYTES = 16 << 10


@dataclass(frozen=True)
class Prepared:
    """A request ready to send to a decode worker."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool  # streaming: send a usage chunk before [DONE]
    logprobs: bool  # report each sampled token's logprob (and params.logprobs alternatives)
    n: int = 1  # choices to answer
    best_of: int = 1  # choices to generate (>= n; the best n are answered)
    tool_use: ToolUse | None = None  # chat with tools: how the answer is read for calls
    # Completions' echo: the prompt's text, starting every choice's; with
    # logprobs, params.prompt_logprobs asks the worker to score the prompt.
    echo: str | None = None


def prepare(
    raw: bytes, endpoint: Endpoint, served: ServedModel, tool_parser: str = DEFAULT_TOOL_PARSER
) -> Prepared:
    """A request body, from its bytes to a request ready to send (or an APIError)."""
    obj = parse_json(raw)
    check_unsupported(obj, endpoint)
    if endpoint == "completions":
        return prepare_completion(parse_as(CompletionRequest, obj), served)
    return prepare_chat(parse_as(ChatCompletionRequest, obj), served, tool_parser)


def prepare_completion(req: CompletionRequest, served: ServedModel) -> Prepared:
    """Validate and tokenize a /v1/completions request."""
    _check_common(req, served)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(
            f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", param="logprobs"
        )
    ids = completion_prompt_ids(req.prompt, served)
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    echo = _prompt_text(req.prompt, ids, served) if req.echo else None
    # echo with logprobs: the prompt's tokens get entries too (prompt logprobs).
    return _prepare(req, served, ids, max_tokens, logprobs=req.logprobs, echo=echo)


def prepare_chat(
    req: ChatCompletionRequest, served: ServedModel, tool_parser: str = DEFAULT_TOOL_PARSER
) -> Prepared:
    """Validate a /v1/chat/completions request and apply the chat template."""
    _check_common(req, served)
    top = req.top_logprobs
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad_request(
            f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}", param="top_logprobs"
        )
    if top and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    if not req.messages:
        raise bad_request("messages must hold at least one message", param="messages")
    tool_use, tools = _tool_use(req, tool_parser)
    ids = chat_prompt_ids(req.messages, served, tools)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else None
    if max_tokens is None:
        max_tokens = req.max_tokens
    if max_tokens is None:  # the rest of the context
        max_tokens = max(1, served.max_model_len - len(ids))
    logprobs = (top or 0) if req.logprobs else None
    return _prepare(req, served, ids, max_tokens, logprobs=logprobs, tools=(tool_use, tools))


def _check_common(req: CompletionRequest | ChatCompletionRequest, served: ServedModel) -> None:
    if req.model is not None and req.model != served.name:
        raise APIError(
            400,
            f"model '{req.model}' is not served here; this server serves '{served.name}'",
            param="model",
            code="model_not_found",
        )
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {req.n}", param="n")


def _prepare(
    req: CompletionRequest | ChatCompletionRequest,
    served: ServedModel,
    ids: list[int],
    max_tokens: int,
    *,
    logprobs: int | None,  # alternatives per token, when logprobs were asked for
    echo: str | None = None,
    tools: tuple[ToolUse | None, list[dict[str, Any]]] = (None, []),
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
    n, best_of = _choices(req, stream)
    # best_of ranks the choices by their logprob: the workers must send it.
    tool_use, tool_list = tools
    forced = None
    if tool_use is not None:
        forced = guided_spec(tool_list, tool_use.mode, tool_use.function, tool_use.parallel)
    if logprobs is None and best_of > n:
        params = _sampling(req, served, max_tokens, 0, forced)
    else:
        params = _sampling(req, served, max_tokens, logprobs, forced)
    if echo is not None and logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=logprobs)
    return Prepared(
        prompt_ids=ids,
        params=params,
        stream=stream,
        # A usage chunk by default; include_usage: false turns it off.
        include_usage=stream and (opts is None or opts.include_usage is not False),
        logprobs=logprobs is not None,
        n=n,
        best_of=best_of,
        echo=echo,
        tool_use=tool_use,
    )


def _choices(req: CompletionRequest | ChatCompletionRequest, stream: bool) -> tuple[int, int]:
    """(n, best_of) of a request."""
    n = req.n or 1
    best_of = getattr(req, "best_of", None)
    if best_of is None:
        return n, n
    if not n <= best_of <= MAX_CHOICES:
        raise bad_request(
            f"best_of must be between n ({n}) and {MAX_CHOICES}, got {best_of}", param="best_of"
        )
    if stream and best_of > n:
        raise bad_request("best_of > n cannot be streamed", param="best_of")
    return n, best_of


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    served: ServedModel,
    max_tokens: int,
    logprobs: int | None,
    forced: GuidedSpec | None = None,  # a forced tool call's grammar
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
    min_tokens = req.min_tokens or 0
    if min_tokens > _INT32_MAX:
        raise bad_request(f"min_tokens must be <= {_INT32_MAX}", param="min_tokens")
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
            logprobs=logprobs,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            repetition_penalty=(
                float(req.repetition_penalty) if req.repetition_penalty is not None else 1.0
            ),
            min_tokens=min_tokens,
            logit_bias=_logit_bias(req.logit_bias, served.vocab_size),
            structured_output=_structured_output(req, forced),
        )
    except ValueError as e:
        # SamplingParams' messages start with the field's name.
        raise bad_request(str(e), param=str(e).split(" ", 1)[0]) from None


def _prompt_text(prompt: Prompt, ids: list[int], served: ServedModel) -> str:
    """The prompt as text, for echo: as sent, or token ids decoded (as vLLM
    decodes them, special tokens included)."""
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]  # one prompt in a list (prompt_ids refuses more)
    if isinstance(prompt, str):
        return prompt
    return str(served.tokenizer.decode(ids))


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token ids as JSON object keys) as (id, bias) pairs."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdecimal() or not 0 <= int(key) < vocab_size:
            raise bad_request(
                f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                param="logit_bias",
            )
        out[int(key)] = float(value)
    return tuple(sorted(out.items()))


def _structured_output(
    req: CompletionRequest | ChatCompletionRequest, forced: GuidedSpec | None
) -> GuidedSpec | None:
    """The grammar the output must follow, from response_format, vLLM's
    guided_* fields or a forced tool call (`forced`): one of them at most.
    Whether the grammar library supports the schema is the worker's to say
    (a 400 naming the feature)."""
    given: dict[str, Any] = {
        name: value
        for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
        if (value := getattr(req, name)) is not None
        and not (name == "response_format" and value.type == "text")
    }
    if forced is not None:
        given["tool_choice"] = forced
    if len(given) > 1:
        names = " and ".join(sorted(given))
        raise bad_request(f"{names} both constrain the output: send one", param=min(given))
    if not given:
        return None
    ((name, value),) = given.items()
    if name == "tool_choice":
        return forced
    try:
        if name == "guided_regex":
            return GuidedSpec("regex", value)
        if name == "guided_choice":
            if not value:
                raise ValueError("guided_choice must hold at least one choice")
            return GuidedSpec.choice(value)
        if name == "guided_json":
            return GuidedSpec.json_schema(value)
        if value.type == "json_object":
            return GuidedSpec("json_object")
        fmt = value.json_schema
        if fmt is None or fmt.schema_ is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return GuidedSpec.json_schema(fmt.schema_)
    except ValueError as e:
        raise bad_request(str(e), param=name) from None


def _tool_use(
    req: ChatCompletionRequest, parser: str
) -> tuple[ToolUse | None, list[dict[str, Any]]]:
    """How the answer is read for tool calls (None: it is text), and the tools
    the chat template shows the model (none under tool_choice "none")."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none" or (choice == "auto" and not tools):
        return None, []
    if not tools:
        raise bad_request("tool_choice requires tools", param="tool_choice")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise bad_request("tools must have distinct function names", param="tools")
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, str):
        return ToolUse(choice, parser, parallel=parallel), tools
    name = choice.function.name
    if name not in names:
        raise bad_request(f"tool_choice names '{name}', which is not in tools", param="tool_choice")
    return ToolUse("named", parser, function=name, parallel=parallel), tools

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

from dataclasses import dataclass

from engine.sampling_params import GuidedSpec, SamplingParams
from router.body import check_unsupported, parse_as, parse_json
from router.errors import APIError, bad_request
from router.prompt_ids import chat_prompt_ids, completion_prompt_ids
from router.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from router.served_model import ServedModel

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n and best_of
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
    logprobs: bool  # report each sampled token's logprob
    n: int = 1  # choices to answer
    best_of: int = 1  # choices to generate (>= n; the best n are answered)


def prepare(raw: bytes, endpoint: Endpoint, served: ServedModel) -> Prepared:
    """A request body, from its bytes to a request ready to send (or an APIError)."""
    obj = parse_json(raw)
    check_unsupported(obj, endpoint)
    if endpoint == "completions":
        return prepare_completion(parse_as(CompletionRequest, obj), served)
    return prepare_chat(parse_as(ChatCompletionRequest, obj), served)


def prepare_completion(req: CompletionRequest, served: ServedModel) -> Prepared:
    """Validate and tokenize a /v1/completions request."""
    _check_common(req, served)
    if req.echo:
        raise bad_request("echo is not supported", param="echo")
    if req.logprobs is not None and req.logprobs < 0:
        raise bad_request(f"logprobs must be >= 0, got {req.logprobs}", param="logprobs")
    if req.logprobs is not None and req.logprobs > 1:
        raise bad_request(
            "logprobs > 1 (the top alternatives) is not supported; 0 or 1 return the "
            "sampled token's log-probability",
            param="logprobs",
        )
    ids = completion_prompt_ids(req.prompt, served)
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    return _prepare(req, served, ids, max_tokens, logprobs=req.logprobs is not None)


def prepare_chat(req: ChatCompletionRequest, served: ServedModel) -> Prepared:
    """Validate a /v1/chat/completions request and apply the chat template."""
    _check_common(req, served)
    if req.top_logprobs:
        raise bad_request("top_logprobs > 0 is not supported yet", param="top_logprobs")
    if not req.messages:
        raise bad_request("messages must hold at least one message", param="messages")
    ids = chat_prompt_ids(req.messages, served)
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
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {req.n}", param="n")


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
    n, best_of = _choices(req, stream)
    # best_of ranks the choices by their logprob: the workers must send it.
    params = _sampling(req, served, max_tokens, logprobs or best_of > n)
    return Prepared(
        prompt_ids=ids,
        params=params,
        stream=stream,
        # A usage chunk by default; include_usage: false turns it off.
        include_usage=stream and (opts is None or opts.include_usage is not False),
        logprobs=logprobs,
        n=n,
        best_of=best_of,
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
            logprobs=0 if logprobs else None,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            repetition_penalty=(
                float(req.repetition_penalty) if req.repetition_penalty is not None else 1.0
            ),
            min_tokens=min_tokens,
            logit_bias=_logit_bias(req.logit_bias, served.vocab_size),
            structured_output=_structured_output(req),
        )
    except ValueError as e:
        # SamplingParams' messages start with the field's name.
        raise bad_request(str(e), param=str(e).split(" ", 1)[0]) from None


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


def _structured_output(req: CompletionRequest | ChatCompletionRequest) -> GuidedSpec | None:
    """The grammar the output must follow, from response_format or vLLM's
    guided_* fields (one of them at most). Whether the grammar library
    supports the schema is the worker's to say (a 400 naming the feature)."""
    given = {
        name: value
        for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
        if (value := getattr(req, name)) is not None
        and not (name == "response_format" and value.type == "text")
    }
    if len(given) > 1:
        names = " and ".join(sorted(given))
        raise bad_request(f"{names} both constrain the output: send one", param=min(given))
    if not given:
        return None
    ((name, value),) = given.items()
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

"""The prompt as token ids: a completion's text (or ids, checked against the
vocabulary), a chat's messages through the model's chat template."""

from __future__ import annotations

import logging
from typing import Any

from router.errors import APIError, bad_request
from router.protocol import ChatMessage
from router.served_model import ServedModel

log = logging.getLogger("splitserve.router")


def completion_prompt_ids(prompt: Any, served: ServedModel) -> list[int]:
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


def chat_prompt_ids(
    messages: list[ChatMessage], served: ServedModel, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The messages (and the tools the model may call) through the model's
    chat template."""
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request(
            f"model '{served.name}' has no chat template; use /v1/completions",
            code="no_chat_template",
        )
    flat: list[dict[str, Any]] = []
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
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        flat.append(message)
    try:
        out = tok.apply_chat_template(
            flat, tools=tools or None, add_generation_prompt=True, tokenize=True
        )
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

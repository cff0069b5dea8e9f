"""The OpenAI response shapes, for completions and chat completions.

A format turns flow events into JSON objects: whole responses when not
streaming, chunks when streaming. Logprobs report the sampled token only:
completions' `top_logprobs` holds one entry per position, `{token: logprob}`
of the token that was sampled (not the top alternatives); chat's
`top_logprobs` is empty (requests with top_logprobs > 0 are refused).
"""

from __future__ import annotations

from typing import Any

from router.flow import Delta, Finish
from router.textstream import TokenInfo


class CompletionFormat:
    """/v1/completions: "text_completion" objects."""

    object = "text_completion"

    def __init__(self, request_id: str, created: int, model: str, logprobs: bool) -> None:
        self.request_id, self.created, self.model = request_id, created, model
        self.logprobs = logprobs

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
        }

    def _logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{t.text: t.logprob} for t in tokens],
            "text_offset": [t.offset for t in tokens],
        }

    def start_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": delta.text,
            "logprobs": self._logprobs(delta.tokens),
            "finish_reason": finish_reason,
        }
        return {**self._head(), "choices": [choice]}

    def final_chunk(self, fin: Finish) -> dict[str, Any]:
        return {**self.chunk(fin.delta, fin.reason), "splitserve_timings": fin.timings}

    def usage_chunk(self, fin: Finish) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": fin.usage()}

    def response(self, fin: Finish, tokens: list[TokenInfo]) -> dict[str, Any]:
        """The whole non-streaming response; `tokens`: every token's logprob entry."""
        choice = {
            "index": 0,
            "text": fin.text,
            "logprobs": self._logprobs(tokens),
            "finish_reason": fin.reason,
        }
        return {
            **self._head(),
            "choices": [choice],
            "usage": fin.usage(),
            "splitserve_timings": fin.timings,
        }


class ChatFormat(CompletionFormat):
    """/v1/chat/completions: "chat.completion" and "chat.completion.chunk" objects."""

    object = "chat.completion.chunk"

    def _logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {
            "content": [
                {
                    "token": t.text,
                    "logprob": t.logprob,
                    "bytes": list(t.text.encode("utf-8")),
                    "top_logprobs": [],
                }
                for t in tokens
            ]
        }

    def start_chunks(self) -> list[dict[str, Any]]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [{**self._head(), "choices": [choice]}]

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs(delta.tokens) if delta.tokens else None,
            "finish_reason": finish_reason,
        }
        return {**self._head(), "choices": [choice]}

    def response(self, fin: Finish, tokens: list[TokenInfo]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": fin.text},
            "logprobs": self._logprobs(tokens),
            "finish_reason": fin.reason,
        }
        return {
            **self._head(),
            "object": "chat.completion",
            "choices": [choice],
            "usage": fin.usage(),
            "splitserve_timings": fin.timings,
        }

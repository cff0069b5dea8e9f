"""The OpenAI response shapes, for completions and chat completions.

A format turns flow events into JSON objects: whole responses when not
streaming, chunks when streaming. Logprobs report the sampled token only:
completions' `top_logprobs` holds one entry per position, `{token: logprob}`
of the token that was sampled (not the top alternatives); chat's
`top_logprobs` is empty (requests with top_logprobs > 0 are refused).
"""

from __future__ import annotations

from typing import Any

from router.flow import Delta, Finish, usage
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

    def start_chunks(self, n: int) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": self._logprobs(delta.tokens),
            "finish_reason": finish_reason,
        }
        return {**self._head(), "choices": [choice]}

    def final_chunk(self, fin: Finish) -> dict[str, Any]:
        """A choice's last chunk: its finish reason and its timings."""
        return {**self.chunk(fin.delta, fin.reason), "splitserve_timings": fin.timings}

    def usage_chunk(self, finishes: list[Finish]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage(finishes)}

    def _choice(self, fin: Finish, tokens: list[TokenInfo]) -> dict[str, Any]:
        return {
            "index": fin.index,
            "text": fin.text,
            "logprobs": self._logprobs(tokens),
            "finish_reason": fin.reason,
        }

    def response(
        self, finishes: list[Finish], tokens: dict[int, list[TokenInfo]]
    ) -> dict[str, Any]:
        """The whole non-streaming response: every choice, by index (`tokens`:
        each choice's logprob entries); the first choice's timings."""
        finishes = sorted(finishes, key=lambda f: f.index)
        return {
            **self._head(),
            "choices": [self._choice(f, tokens.get(f.index, [])) for f in finishes],
            "usage": usage(finishes),
            "splitserve_timings": finishes[0].timings,
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

    def start_chunks(self, n: int) -> list[dict[str, Any]]:
        return [
            {
                **self._head(),
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            for i in range(n)
        ]

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {
            "index": delta.index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs(delta.tokens) if delta.tokens else None,
            "finish_reason": finish_reason,
        }
        return {**self._head(), "choices": [choice]}

    def _choice(self, fin: Finish, tokens: list[TokenInfo]) -> dict[str, Any]:
        return {
            "index": fin.index,
            "message": {"role": "assistant", "content": fin.text},
            "logprobs": self._logprobs(tokens),
            "finish_reason": fin.reason,
        }

    def response(
        self, finishes: list[Finish], tokens: dict[int, list[TokenInfo]]
    ) -> dict[str, Any]:
        return {**super().response(finishes, tokens), "object": "chat.completion"}

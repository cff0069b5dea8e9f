"""The OpenAI response shapes, for completions and chat completions.

A format turns flow events into JSON objects: whole responses when not
streaming, chunks when streaming. Logprobs, per position: completions'
`top_logprobs` is `{token: logprob}` of the sampled token and then the
`logprobs` most likely ones (so up to logprobs + 1 entries, as OpenAI and
vLLM answer; logprobs = 0 gives the sampled token alone); chat's is the
`top_logprobs` most likely tokens, `[{token, logprob, bytes}]`, most likely
first. With echo, completions' entries start with the prompt's tokens (the
first with None for its logprob and its top_logprobs) and `text_offset`
counts from the start of the echoed prompt.
"""

from __future__ import annotations

from typing import Any

from router.flow import Delta, Finish, usage
from router.textstream import TokenInfo
from router.tools import StreamedAnswer, ToolUse


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
            "top_logprobs": [_completion_top(t) for t in tokens],
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
    """/v1/chat/completions: "chat.completion" and "chat.completion.chunk" objects.

    With tools (router/tools.py), an answer's calls go in `message.tool_calls`
    (streamed: one `delta.tool_calls` chunk at the end, each call whole, after
    any content that came before it) and finish "tool_calls"."""

    object = "chat.completion.chunk"

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        logprobs: bool,
        tool_use: ToolUse | None = None,
    ) -> None:
        super().__init__(request_id, created, model, logprobs)
        self.tool_use = tool_use
        self._answers: dict[int, StreamedAnswer] = {}  # per choice, while streaming

    def _content(self, delta: Delta) -> str:
        """What of the delta's text goes out now as content."""
        if self.tool_use is None:
            return delta.text
        answer = self._answers.setdefault(delta.index, StreamedAnswer(self.tool_use))
        return answer.feed(delta.text)

    def _logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {
            "content": [
                {
                    "token": t.text,
                    "logprob": t.logprob,
                    "bytes": list(t.text.encode("utf-8")),
                    "top_logprobs": [
                        {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
                        for text, lp in t.top
                    ],
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
        text = self._content(delta)
        choice = {
            "index": delta.index,
            "delta": {"content": text} if text else {},
            "logprobs": self._logprobs(delta.tokens) if delta.tokens else None,
            "finish_reason": finish_reason,
        }
        return {**self._head(), "choices": [choice]}

    def final_chunk(self, fin: Finish) -> dict[str, Any]:
        if self.tool_use is None:
            return super().final_chunk(fin)
        text = self._content(fin.delta)
        rest, calls = self._answers[fin.index].finish(fin.text)
        delta: dict[str, Any] = {"content": text + rest} if text + rest else {}
        if calls:
            delta["tool_calls"] = [c.as_openai(i) for i, c in enumerate(calls)]
        choice = {
            "index": fin.index,
            "delta": delta,
            "logprobs": self._logprobs(fin.delta.tokens) if fin.delta.tokens else None,
            "finish_reason": "tool_calls" if calls else fin.reason,
        }
        return {**self._head(), "choices": [choice], "splitserve_timings": fin.timings}

    def _choice(self, fin: Finish, tokens: list[TokenInfo]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": fin.text}
        reason = fin.reason
        if self.tool_use is not None:
            content, calls = self.tool_use.read(fin.text)
            if calls:
                message = {
                    "role": "assistant",
                    "content": content,
                    "tool_calls": [c.as_openai() for c in calls],
                }
                reason = "tool_calls"
        return {
            "index": fin.index,
            "message": message,
            "logprobs": self._logprobs(tokens),
            "finish_reason": reason,
        }

    def response(
        self, finishes: list[Finish], tokens: dict[int, list[TokenInfo]]
    ) -> dict[str, Any]:
        return {**super().response(finishes, tokens), "object": "chat.completion"}


def _completion_top(t: TokenInfo) -> dict[str, float] | None:
    """The sampled token first, then the alternatives; a text two tokens
    share keeps the first (likelier) one's logprob. None for a token
    without a logprob (the first prompt token, with echo)."""
    if t.logprob is None:
        return None
    top: dict[str, float] = {t.text: t.logprob}
    for text, lp in t.top:
        top.setdefault(text, lp)
    return top
